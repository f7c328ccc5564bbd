//! Durations in settings, written the same way in every connector's section: a number
//! of seconds (`30`, `2.5`, or `"30"` from the environment) or a string with units as
//! the `humantime` crate reads them (`"500ms"`, `"30s"`, `"15m"`, `"2h"`, `"1h 30m"`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration setting. Never negative.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSetting(pub Duration);

impl DurationSetting {
    /// `n` seconds (for settings' defaults).
    pub const fn secs(n: u64) -> Self {
        DurationSetting(Duration::from_secs(n))
    }

    /// Parses the text form: seconds, or a humantime duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Ok(secs) = t.parse::<f64>() {
            return Self::from_secs(secs);
        }
        humantime::parse_duration(t)
            .map(DurationSetting)
            .map_err(|e| format!("not a duration: {text:?} ({e}); write 30, \"30s\", \"500ms\", \"15m\" or \"2h\""))
    }

    fn from_secs(secs: f64) -> Result<Self, String> {
        if secs.is_finite() && secs >= 0.0 {
            Ok(DurationSetting(Duration::from_secs_f64(secs)))
        } else {
            Err(format!(
                "not a duration: {secs} (must be a positive number of seconds)"
            ))
        }
    }
}

impl From<DurationSetting> for Duration {
    fn from(d: DurationSetting) -> Duration {
        d.0
    }
}

impl fmt::Debug for DurationSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for DurationSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(DurationSetting(Duration::from_secs(n))),
            Raw::Float(f) => DurationSetting::from_secs(f).map_err(serde::de::Error::custom),
            Raw::Text(t) => DurationSetting::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_units() {
        let p = |s: &str| DurationSetting::parse(s).map(|d| d.0);
        assert_eq!(p("30"), Ok(Duration::from_secs(30)));
        assert_eq!(p("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(p("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(p("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(p("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(p("-1").is_err());
        assert!(p("soon").is_err());
    }
}
