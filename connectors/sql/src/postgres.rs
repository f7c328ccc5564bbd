//! Reading from PostgreSQL: one read-only, repeatable-read transaction; the query
//! wrapped so that the server turns every column into text (`SELECT "col"::text … FROM
//! (query) q`), bound to a portal and fetched `fetch_size` rows at a time, so that a
//! table of ten million rows reads in bounded memory.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use contactsync_core::{ConnectorError, ExposeSecret};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config};

use crate::config::{redact, SqlConfig};
use crate::query::bind_since;
use crate::reading::{Query, Reading};
use crate::values::{Column, Kind};

/// An open connection, its driver task running.
pub struct Connection {
    pub client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unavailable(config: &SqlConfig, what: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Other(format!("the database {}: {what}", redact(&config.url)))
}

/// What the server said, in a line (its message, detail and hint).
pub fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_string();
            if let Some(d) = db.detail() {
                text.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                text.push_str(&format!("; hint: {h}"));
            }
            text
        }
        None => e.to_string(),
    }
}

/// Connects as the URL says; TLS as its `sslmode` says (`prefer` by default), always
/// verifying the server against `ca_file` or the web roots, as the PostgreSQL state does.
pub async fn connect(config: &SqlConfig) -> Result<Connection, ConnectorError> {
    let mut pg: Config = config.url.parse().map_err(|e: tokio_postgres::Error| {
        unavailable(config, format!("not a PostgreSQL URL: {e}"))
    })?;
    if let Some(p) = &config.password {
        pg.password(p.expose_secret());
    }
    if pg.get_application_name().is_none() {
        pg.application_name("contactsync");
    }
    let certificates = match &config.ca_file {
        Some(path) => contactsync_tls::read_ca_file(path).map_err(|e| unavailable(config, e))?,
        None => Vec::new(),
    };
    let tls = contactsync_tls::client_config(&certificates).map_err(|e| unavailable(config, e))?;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(Arc::unwrap_or_clone(tls));
    let hosts = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let ports = pg
        .get_ports()
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (client, connection) = pg.connect(tls).await.map_err(|e| {
        ConnectorError::Other(format!(
            "cannot connect to the database at {hosts} port {}: {}",
            if ports.is_empty() {
                config.dialect.default_port().to_string()
            } else {
                ports
            },
            server_message(&e)
        ))
    })?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("the database connection ended: {e}");
        }
    });
    Ok(Connection { client, task })
}

/// The query's columns, described by the server without running it.
pub async fn describe(
    client: &impl tokio_postgres::GenericClient,
    text: &str,
    name: &str,
) -> Result<(Vec<Column>, Vec<Type>), ConnectorError> {
    let statement = client
        .prepare(text)
        .await
        .map_err(|e| query_error(name, &e))?;
    let columns = statement
        .columns()
        .iter()
        .map(|c| Column::new(c.name(), kind_of(c.type_()), c.type_().name()))
        .collect();
    Ok((columns, statement.params().to_vec()))
}

/// An error of the query `name` (`query` or `incremental_query`).
pub fn query_error(name: &str, e: &tokio_postgres::Error) -> ConnectorError {
    ConnectorError::Other(format!("`{name}` failed: {}", server_message(e)))
}

fn kind_of(t: &Type) -> Kind {
    match *t {
        Type::BOOL => Kind::Bool,
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => Kind::Integer,
        Type::NUMERIC | Type::FLOAT4 | Type::FLOAT8 => Kind::Number,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UUID => Kind::Text,
        Type::DATE => Kind::Date,
        Type::TIMESTAMP => Kind::Timestamp,
        Type::TIMESTAMPTZ => Kind::TimestampTz,
        _ if t.name() == "citext" => Kind::Text,
        _ => Kind::Other,
    }
}

/// The cursor as the parameter `since` the server expects (its type inferred from the
/// query), or why it cannot be.
pub fn since_param(param: &Type, since: &str) -> Result<Box<dyn ToSql + Sync + Send>, String> {
    let bad =
        |e: &dyn std::fmt::Display| format!("the cursor {since:?} is not a {}: {e}", param.name());
    Ok(match *param {
        Type::TIMESTAMPTZ => Box::new(
            DateTime::parse_from_rfc3339(since)
                .map_err(|e| bad(&e))?
                .with_timezone(&Utc),
        ),
        Type::TIMESTAMP => Box::new(
            DateTime::parse_from_rfc3339(since)
                .map(|t| t.naive_utc())
                .or_else(|_| NaiveDateTime::parse_from_str(since, "%Y-%m-%dT%H:%M:%S%.f"))
                .map_err(|e| bad(&e))?,
        ),
        Type::DATE => Box::new(NaiveDate::parse_from_str(since, "%Y-%m-%d").map_err(|e| bad(&e))?),
        Type::INT2 => Box::new(since.parse::<i16>().map_err(|e| bad(&e))?),
        Type::INT4 => Box::new(since.parse::<i32>().map_err(|e| bad(&e))?),
        Type::INT8 => Box::new(since.parse::<i64>().map_err(|e| bad(&e))?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => Box::new(since.to_string()),
        _ => {
            return Err(format!(
                ":since is compared with a {}: compare the cursor column as a timestamp, a date, an integer or text",
                param.name()
            ))
        }
    })
}

/// The query wrapped so that every column comes as text in the server's own format,
/// under the session's settings (UTC, ISO dates).
pub fn as_text(text: &str, columns: &[Column]) -> String {
    let list = columns
        .iter()
        .map(|c| {
            let quoted = format!("\"{}\"", c.name.replace('"', "\"\""));
            format!("{quoted}::text AS {quoted}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {list} FROM (\n{text}\n) AS contactsync_query")
}

/// The columns of each of `queries` (name, text), described by the server on one
/// connection without running them.
pub async fn describe_all(
    config: &SqlConfig,
    queries: &[(&'static str, &str)],
) -> Result<Vec<Vec<Column>>, ConnectorError> {
    let connection = connect(config).await?;
    let mut described = Vec::new();
    for (name, text) in queries {
        let (columns, _) = describe(&connection.client, &bind_since(text, "$1").0, name).await?;
        described.push(columns);
    }
    Ok(described)
}

/// Runs `query` in a read-only, repeatable-read transaction and sends each row to
/// `reading`, fetched from a portal `fetch_size` rows at a time.
pub async fn read(
    config: &SqlConfig,
    query: &Query,
    reading: &mut Reading,
) -> Result<(), ConnectorError> {
    let name = query.name;
    let mut connection = connect(config).await?;
    // One snapshot, and no write whatever the query tries: the server refuses it.
    let client = connection
        .client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(|e| query_error(name, &e))?;
    client
        .batch_execute("SET LOCAL TIME ZONE 'UTC'; SET LOCAL DateStyle = 'ISO'")
        .await
        .map_err(|e| query_error(name, &e))?;
    let (text, _) = bind_since(&query.text, "$1");
    let (columns, params) = describe(&client, &text, name).await?;
    let statement = client
        .prepare(&as_text(&text, &columns))
        .await
        .map_err(|e| query_error(name, &e))?;
    reading.start(columns);
    let mut bound: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    if let (Some(since), Some(param)) = (&query.since, params.first()) {
        bound.push(
            since_param(param, since)
                .map_err(|e| ConnectorError::Other(format!("`{name}`: {e}")))?,
        );
    }
    let params: Vec<&(dyn ToSql + Sync)> = bound
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let portal = client
        .bind(&statement, &params)
        .await
        .map_err(|e| query_error(name, &e))?;
    loop {
        let rows = client
            .query_portal(&portal, config.fetch_size as i32)
            .await
            .map_err(|e| query_error(name, &e))?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let mut values = Vec::with_capacity(reading.columns().len());
            for (i, column) in reading.columns().iter().enumerate() {
                let raw: Option<&str> = row.try_get(i).map_err(|e| query_error(name, &e))?;
                values.push(raw.map(|raw| column.text(raw)));
            }
            if !reading.send(values).await {
                return Ok(());
            }
        }
    }
    let _ = client.commit().await;
    Ok(())
}
