//! Reading from MySQL or MariaDB (`mysql_async`): one `START TRANSACTION READ ONLY, WITH
//! CONSISTENT SNAPSHOT` at repeatable read, the session in UTC, the query prepared (its
//! columns described without running it) and executed with `:since` bound to each `?`,
//! and its result read row by row off the connection as the server streams it, so that
//! a table of ten million rows reads in bounded memory.
//!
//! TLS: the URL's `sslmode` (PostgreSQL's words, `disable`, `prefer`, `require`,
//! `verify-ca`, `verify-full`) or `ssl-mode` (MySQL's, `DISABLED` … `VERIFY_IDENTITY`).
//! Whatever the mode, a TLS connection verifies the server's certificate and name,
//! against `ca_file` alone when it is set, else the web's roots, as the PostgreSQL
//! state does; `prefer` (the default) falls back to plain text only when the server
//! offers no TLS at all. mysql_async's own switches that would turn verification off
//! (`verify_ca`, `verify_identity`, `require_ssl`, `built_in_roots`) are refused.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use contactsync_core::{ConnectorError, ExposeSecret};
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, SslOpts, Value};

use crate::config::{redact, SqlConfig};
use crate::query::bind_since;
use crate::reading::{Query, Reading};
use crate::values::{utc_text, Column, Kind};

/// Whether a connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Never.
    Disable,
    /// When the server offers it (verified); plain text when it offers none.
    Prefer,
    /// Always (verified); a server without TLS is an error.
    Require,
}

/// The URL's options for `mysql_async`, and its TLS mode; why not, for the user.
pub fn options(url: &str) -> Result<(Opts, TlsMode), String> {
    let mut parsed = url::Url::parse(url).map_err(|e| format!("{}: {e}", redact(url)))?;
    let mut mode = TlsMode::Prefer;
    let mut kept = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "sslmode" | "ssl-mode" | "ssl_mode" => {
                mode = match value.to_ascii_lowercase().replace('_', "-").as_str() {
                    "disable" | "disabled" => TlsMode::Disable,
                    "prefer" | "preferred" | "allow" => TlsMode::Prefer,
                    "require" | "required" | "verify-ca" | "verify-full" | "verify-identity" => {
                        TlsMode::Require
                    }
                    other => {
                        return Err(format!(
                            "{key}={other}: use disable, prefer, require, verify-ca or verify-full"
                        ))
                    }
                }
            }
            "require_ssl" | "verify_ca" | "verify_identity" | "built_in_roots" => {
                return Err(format!(
                    "{key}: set `sslmode` in the URL and `ca_file` instead; the server's certificate is always verified"
                ))
            }
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let text = parsed.as_str();
    // mysql_async reads only `mysql://`.
    let text = match text.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => text.to_string(),
    };
    let opts = Opts::from_url(&text).map_err(|e| format!("{}: {e}", redact(url)))?;
    Ok((opts, mode))
}

fn unavailable(config: &SqlConfig, what: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Other(format!("the database {}: {what}", redact(&config.url)))
}

/// What the server said, in a line.
pub fn server_message(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state)
        }
        other => other.to_string(),
    }
}

/// An error of the query `name` (`query` or `incremental_query`).
pub fn query_error(name: &str, e: &mysql_async::Error) -> ConnectorError {
    ConnectorError::Other(format!("`{name}` failed: {}", server_message(e)))
}

/// Connects as the URL says, over TCP, the session in UTC.
pub async fn connect(config: &SqlConfig) -> Result<Conn, ConnectorError> {
    let (opts, mode) = options(&config.url).map_err(|e| unavailable(config, e))?;
    let host = opts.ip_or_hostname().to_string();
    let port = opts.tcp_port();
    let mut builder = OptsBuilder::from_opts(opts)
        // The URL names a host and a port: never a local socket found behind them.
        .prefer_socket(false)
        .init(vec!["SET time_zone = '+00:00'"]);
    if let Some(p) = &config.password {
        builder = builder.pass(Some(p.expose_secret()));
    }
    let ssl = match mode {
        TlsMode::Disable => None,
        TlsMode::Prefer | TlsMode::Require => {
            let mut ssl = SslOpts::default();
            if let Some(path) = &config.ca_file {
                let certificates =
                    contactsync_tls::read_ca_file(path).map_err(|e| unavailable(config, e))?;
                ssl = ssl
                    .with_root_certs(
                        certificates
                            .into_iter()
                            .map(|c| c.to_vec().into())
                            .collect(),
                    )
                    .with_disable_built_in_roots(true);
            }
            Some(ssl)
        }
    };
    let failed = |e: mysql_async::Error| {
        ConnectorError::Other(format!(
            "cannot connect to the database at {host} port {port}: {}",
            server_message(&e)
        ))
    };
    let tls = ssl.is_some();
    match Conn::new(builder.clone().ssl_opts(ssl)).await {
        Ok(conn) => Ok(conn),
        Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
            if tls && mode == TlsMode::Prefer =>
        {
            tracing::debug!(
                "{host} port {port} offers no TLS: connecting in plain text (sslmode=prefer)"
            );
            Conn::new(builder.ssl_opts(None)).await.map_err(failed)
        }
        Err(e) => Err(failed(e)),
    }
}

/// A result column as the source reads it.
fn column(c: &mysql_async::Column) -> Column {
    let binary = c.character_set() == 63;
    let (kind, type_name) = match c.column_type() {
        ColumnType::MYSQL_TYPE_TINY if c.column_length() == 1 => (Kind::Bool, "tinyint(1)"),
        ColumnType::MYSQL_TYPE_TINY => (Kind::Integer, "tinyint"),
        ColumnType::MYSQL_TYPE_SHORT => (Kind::Integer, "smallint"),
        ColumnType::MYSQL_TYPE_INT24 => (Kind::Integer, "mediumint"),
        ColumnType::MYSQL_TYPE_LONG => (Kind::Integer, "int"),
        ColumnType::MYSQL_TYPE_LONGLONG => (Kind::Integer, "bigint"),
        ColumnType::MYSQL_TYPE_YEAR => (Kind::Integer, "year"),
        ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
            (Kind::Number, "decimal")
        }
        ColumnType::MYSQL_TYPE_FLOAT => (Kind::Number, "float"),
        ColumnType::MYSQL_TYPE_DOUBLE => (Kind::Number, "double"),
        ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE => (Kind::Date, "date"),
        ColumnType::MYSQL_TYPE_DATETIME | ColumnType::MYSQL_TYPE_DATETIME2 => {
            (Kind::Timestamp, "datetime")
        }
        ColumnType::MYSQL_TYPE_TIMESTAMP | ColumnType::MYSQL_TYPE_TIMESTAMP2 => {
            (Kind::TimestampTz, "timestamp")
        }
        ColumnType::MYSQL_TYPE_VARCHAR
        | ColumnType::MYSQL_TYPE_VAR_STRING
        | ColumnType::MYSQL_TYPE_STRING
            if binary =>
        {
            (Kind::Other, "varbinary")
        }
        ColumnType::MYSQL_TYPE_VARCHAR | ColumnType::MYSQL_TYPE_VAR_STRING => {
            (Kind::Text, "varchar")
        }
        ColumnType::MYSQL_TYPE_STRING if c.flags().contains(ColumnFlags::ENUM_FLAG) => {
            (Kind::Text, "enum")
        }
        ColumnType::MYSQL_TYPE_STRING if c.flags().contains(ColumnFlags::SET_FLAG) => {
            (Kind::Text, "set")
        }
        ColumnType::MYSQL_TYPE_STRING => (Kind::Text, "char"),
        ColumnType::MYSQL_TYPE_ENUM => (Kind::Text, "enum"),
        ColumnType::MYSQL_TYPE_SET => (Kind::Text, "set"),
        ColumnType::MYSQL_TYPE_TINY_BLOB
        | ColumnType::MYSQL_TYPE_MEDIUM_BLOB
        | ColumnType::MYSQL_TYPE_LONG_BLOB
        | ColumnType::MYSQL_TYPE_BLOB
            if binary =>
        {
            (Kind::Other, "blob")
        }
        ColumnType::MYSQL_TYPE_TINY_BLOB
        | ColumnType::MYSQL_TYPE_MEDIUM_BLOB
        | ColumnType::MYSQL_TYPE_LONG_BLOB
        | ColumnType::MYSQL_TYPE_BLOB => (Kind::Text, "text"),
        ColumnType::MYSQL_TYPE_TIME | ColumnType::MYSQL_TYPE_TIME2 => (Kind::Other, "time"),
        ColumnType::MYSQL_TYPE_BIT => (Kind::Other, "bit"),
        ColumnType::MYSQL_TYPE_JSON => (Kind::Other, "json"),
        ColumnType::MYSQL_TYPE_GEOMETRY => (Kind::Other, "geometry"),
        ColumnType::MYSQL_TYPE_NULL => (Kind::Text, "null"),
        _ => (Kind::Other, "an unknown type"),
    };
    Column::new(&c.name_str(), kind, type_name)
}

/// A value of `column` in the documented format, or why it cannot be read.
fn text(column: &Column, value: Value) -> Result<String, String> {
    if column.kind == Kind::Other {
        return Err(column.not_read());
    }
    let not_a = |what: &str, shown: &dyn std::fmt::Debug| {
        format!("column {}: {shown:?} is not a {what}", column.name)
    };
    Ok(match value {
        Value::NULL => String::new(),
        Value::Bytes(bytes) => String::from_utf8(bytes).map_err(|_| {
            format!(
                "column {} is not UTF-8 text: convert it in the query",
                column.name
            )
        })?,
        Value::Int(i) if column.kind == Kind::Bool => (i != 0).to_string(),
        Value::UInt(u) if column.kind == Kind::Bool => (u != 0).to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(f) => f.to_string(),
        Value::Date(y, m, d, h, mi, s, us) => {
            let shown = format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}");
            let at = NaiveDate::from_ymd_opt(y.into(), m.into(), d.into())
                .and_then(|date| date.and_hms_micro_opt(h.into(), mi.into(), s.into(), us))
                .ok_or_else(|| not_a("date", &shown))?;
            match column.kind {
                Kind::Date => at.date().format("%Y-%m-%d").to_string(),
                _ => utc_text(at.and_utc()),
            }
        }
        Value::Time(..) => return Err(column.not_read()),
    })
}

/// The cursor as the value `:since` is compared with, as the cursor column reads.
fn since_value(kind: Option<Kind>, since: &str) -> Result<Value, String> {
    let date = |t: NaiveDateTime| {
        use chrono::{Datelike, Timelike};
        Value::Date(
            t.year().clamp(0, 9999) as u16,
            t.month() as u8,
            t.day() as u8,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            t.nanosecond() / 1000,
        )
    };
    let bad =
        |what: &str, e: &dyn std::fmt::Display| format!("the cursor {since:?} is not {what}: {e}");
    Ok(match kind {
        Some(Kind::Timestamp | Kind::TimestampTz) => date(
            DateTime::parse_from_rfc3339(since)
                .map(|t| t.naive_utc())
                .or_else(|_| NaiveDateTime::parse_from_str(since, "%Y-%m-%dT%H:%M:%S%.f"))
                .map_err(|e| bad("a timestamp", &e))?,
        ),
        Some(Kind::Date) => date(
            NaiveDate::parse_from_str(since, "%Y-%m-%d")
                .map_err(|e| bad("a date", &e))?
                .and_time(chrono::NaiveTime::MIN),
        ),
        Some(Kind::Integer) => Value::Int(since.parse().map_err(|e| bad("an integer", &e))?),
        Some(Kind::Bool | Kind::Other) => {
            return Err("compare the cursor column as a timestamp, a date, a number or text".into())
        }
        Some(Kind::Number | Kind::Text) | None => Value::Bytes(since.as_bytes().to_vec()),
    })
}

/// The columns of each of `queries` (name, text), described by the server on one
/// connection: prepared, never run.
pub async fn describe_all(
    config: &SqlConfig,
    queries: &[(&'static str, &str)],
) -> Result<Vec<Vec<Column>>, ConnectorError> {
    let mut conn = connect(config).await?;
    let mut described = Vec::new();
    for (name, text) in queries {
        let statement = conn
            .prep(bind_since(text, "?").0)
            .await
            .map_err(|e| query_error(name, &e))?;
        described.push(statement.columns().iter().map(column).collect());
        let _ = conn.close(statement).await;
    }
    let _ = conn.disconnect().await;
    Ok(described)
}

/// Runs `query` in a read-only transaction that sees one snapshot and sends each row
/// to `reading` as the server streams it.
pub async fn read(
    config: &SqlConfig,
    query: &Query,
    reading: &mut Reading,
) -> Result<(), ConnectorError> {
    let name = query.name;
    let failed = |e: mysql_async::Error| query_error(name, &e);
    let mut conn = connect(config).await?;
    // One snapshot, and no write whatever the query tries: the server refuses it.
    conn.query_drop("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(failed)?;
    conn.query_drop("START TRANSACTION READ ONLY, WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(failed)?;
    let statement = conn
        .prep(bind_since(&query.text, "?").0)
        .await
        .map_err(failed)?;
    reading.start(statement.columns().iter().map(column).collect());
    let params = match &query.since {
        Some(since) => {
            let value = since_value(reading.cursor_kind(), since)
                .map_err(|e| ConnectorError::Other(format!("`{name}`: {e}")))?;
            Params::Positional(vec![value; usize::from(statement.num_params())])
        }
        None => Params::Empty,
    };
    let mut result = conn.exec_iter(&statement, params).await.map_err(failed)?;
    while let Some(row) = result.next().await.map_err(failed)? {
        let values: Vec<_> = row
            .unwrap_raw()
            .into_iter()
            .zip(reading.columns())
            .map(|(value, column)| match value {
                None | Some(Value::NULL) => None,
                Some(value) => Some(text(column, value)),
            })
            .collect();
        if !reading.send(values).await {
            return Ok(());
        }
    }
    drop(result);
    let _ = conn.query_drop("COMMIT").await;
    let _ = conn.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_says_the_tls_mode_and_cannot_turn_verification_off() {
        let (opts, mode) = options("mysql://sync@db.internal:3307/hr").expect("plain");
        assert_eq!(
            (opts.ip_or_hostname(), opts.tcp_port(), mode),
            ("db.internal", 3307, TlsMode::Prefer)
        );
        assert_eq!(
            options("mariadb://sync@h/hr?sslmode=verify-full")
                .expect("mariadb")
                .1,
            TlsMode::Require
        );
        assert_eq!(
            options("mysql://sync@h/hr?ssl-mode=DISABLED")
                .expect("off")
                .1,
            TlsMode::Disable
        );
        assert!(options("mysql://sync@h/hr?verify_ca=false")
            .expect_err("refused")
            .contains("always verified"));
        assert!(
            options("mysql://sync:pw@h/hr?sslmode=sometimes").is_err_and(|e| !e.contains("pw@"))
        );
    }

    #[test]
    fn values_have_the_documented_format() {
        let ts = Column::new("updated_at", Kind::TimestampTz, "timestamp");
        assert_eq!(
            text(&ts, Value::Date(2026, 12, 7, 10, 0, 0, 250_000)).as_deref(),
            Ok("2026-12-07T10:00:00.250Z")
        );
        let day = Column::new("attributes.start", Kind::Date, "date");
        assert_eq!(
            text(&day, Value::Date(2026, 12, 7, 0, 0, 0, 0)).as_deref(),
            Ok("2026-12-07")
        );
        assert!(text(&day, Value::Date(0, 0, 0, 0, 0, 0, 0))
            .is_err_and(|e| e.contains("attributes.start")));
        let flag = Column::new("attributes.vip", Kind::Bool, "tinyint(1)");
        assert_eq!(text(&flag, Value::Int(1)).as_deref(), Ok("true"));
        let time = Column::new("attributes.shift", Kind::Other, "time");
        assert!(text(&time, Value::Time(false, 0, 8, 0, 0, 0))
            .is_err_and(|e| e.contains("attributes.shift") && e.contains("time")));
        assert_eq!(
            since_value(Some(Kind::TimestampTz), "2026-12-07T10:00:00.5Z"),
            Ok(Value::Date(2026, 12, 7, 10, 0, 0, 500_000))
        );
        assert_eq!(since_value(Some(Kind::Integer), "42"), Ok(Value::Int(42)));
    }
}
