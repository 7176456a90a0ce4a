//! The admin API's token requests, validated as they are read: a body that
//! deserialises is a valid request, up to the configured device-list limit
//! checked by [`parse_create`].

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::auth::{Devices, RateLimit, Scopes, Status};
use crate::timefmt;

/// Longest token name, in characters.
pub const MAX_NAME_CHARS: usize = 255;

/// A `POST …/tokens` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateToken {
    #[serde(deserialize_with = "name")]
    pub name: String,
    #[serde(rename = "scope")]
    pub scopes: Scopes,
    /// `None`: inherit the minter's.
    #[serde(default)]
    pub devices: Option<Devices>,
    /// Epoch milliseconds; `None`: inherit the minter's chain's.
    #[serde(rename = "expirationDate", default, deserialize_with = "expiration")]
    pub expires_at: Option<i64>,
    #[serde(default = "active", deserialize_with = "status_or_active")]
    pub status: Status,
    /// `None`: inherit the minter's.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// A `PATCH …/tokens/{id}` body: at least one of the two.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateToken {
    #[serde(default)]
    pub status: Option<Status>,
    #[serde(default, deserialize_with = "optional_name")]
    pub name: Option<String>,
}

/// Parses and validates a `POST …/tokens` body.
pub fn parse_create(body: &[u8], max_devices: usize) -> Result<CreateToken, String> {
    let req: CreateToken = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if let Some(n) = req.devices.as_ref().and_then(Devices::listed) {
        if n > max_devices {
            return Err(format!(
                "`devices` lists {n} devices, more than {max_devices} (`tokens.max_devices_per_token`)"
            ));
        }
    }
    Ok(req)
}

/// Parses and validates a `PATCH …/tokens/{id}` body.
pub fn parse_update(body: &[u8]) -> Result<UpdateToken, String> {
    let upd: UpdateToken = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if upd.status.is_none() && upd.name.is_none() {
        return Err("give `status` and/or `name`".into());
    }
    Ok(upd)
}

fn active() -> Status {
    Status::Active
}

fn status_or_active<'de, D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
    Ok(Option::<Status>::deserialize(d)?.unwrap_or(Status::Active))
}

fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(D::Error::custom(format_args!(
            "`name` must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(D::Error::custom(
            "`name` must not contain control characters",
        ));
    }
    Ok(name)
}

fn optional_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Name(#[serde(deserialize_with = "name")] String);
    Ok(Option::<Name>::deserialize(d)?.map(|n| n.0))
}

/// An RFC 3339 string, epoch milliseconds or null.
fn expiration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => timefmt::parse_rfc3339(&s)
            .map(Some)
            .map_err(|e| D::Error::custom(format_args!("`expirationDate`: {e}"))),
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(|ms| timefmt::check_ms(ms).ok())
            .map(Some)
            .ok_or_else(|| {
                D::Error::custom("`expirationDate` in epoch milliseconds is out of range")
            }),
        _ => Err(D::Error::custom(
            "`expirationDate` must be an RFC 3339 string, epoch milliseconds or null",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    #[test]
    fn create_body_validation() {
        let ok = parse_create(
            br#"{"name":"n","scope":["device.sendState"],"devices":["d1","d2"],"expirationDate":"2030-01-01T00:00:00Z","rateLimit":{"perSecond":5,"burst":10}}"#,
            100,
        )
        .unwrap();
        assert_eq!(ok.scopes, Scopes::of(&[Scope::SendState]));
        assert_eq!(ok.expires_at, Some(1_893_456_000_000));
        assert_eq!(ok.status, Status::Active);
        assert_eq!(ok.devices, Some(Devices::only(["d1".into(), "d2".into()])));
        let ok = parse_create(
            br#"{"name":"n","scope":["device.sendState"],"expirationDate":1000,"status":"inactive","devices":null}"#,
            100,
        )
        .unwrap();
        assert_eq!(
            (ok.expires_at, ok.status, ok.devices),
            (Some(1000), Status::Inactive, None)
        );
        let ok = parse_create(br#"{"name":"n","scope":["token.read"],"status":null}"#, 1).unwrap();
        assert_eq!(ok.status, Status::Active);
        for (body, want) in [
            (r#"{"scope":["device.sendState"]}"#, "missing field `name`"),
            (r#"{"name":"n"}"#, "missing field `scope`"),
            (r#"{"name":"n","scope":[]}"#, "at least one scope"),
            (r#"{"name":"n","scope":["root"]}"#, "unknown scope"),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":[]}"#,
                "must not be empty",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":["a/b"]}"#,
                "not a device id",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":["*","a"]}"#,
                "must stand alone",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"status":"gone"}"#,
                "`status`",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"status":"deleted"}"#,
                "`status`",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"expirationDate":"soon"}"#,
                "expirationDate",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"expirationDate":true}"#,
                "expirationDate",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"expirationDate":-1}"#,
                "out of range",
            ),
            (r#"{"name":"","scope":["device.sendState"]}"#, "`name`"),
            (
                r#"{"name":"a\u0007","scope":["device.sendState"]}"#,
                "control",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"admin":true}"#,
                "unknown field",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"rateLimit":{"perSecond":0,"burst":1}}"#,
                "at least 1",
            ),
            (r#"[1]"#, "invalid type"),
        ] {
            let e = parse_create(body.as_bytes(), 100).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let many: Vec<String> = (0..5).map(|i| format!("\"d{i}\"")).collect();
        let body = format!(
            r#"{{"name":"n","scope":["device.sendState"],"devices":[{}]}}"#,
            many.join(",")
        );
        let e = parse_create(body.as_bytes(), 4).unwrap_err();
        assert!(
            e.contains("more than 4") && e.contains("max_devices_per_token"),
            "{e}"
        );
    }

    #[test]
    fn patch_body_validation() {
        let u = parse_update(br#"{"status":"inactive"}"#).unwrap();
        assert_eq!(u.status, Some(Status::Inactive));
        let u = parse_update(br#"{"name":"x"}"#).unwrap();
        assert_eq!((u.status, u.name.as_deref()), (None, Some("x")));
        assert!(parse_update(b"{}").is_err());
        assert!(parse_update(br#"{"name":null}"#).is_err());
        assert!(parse_update(br#"{"name":""}"#).is_err());
        assert!(parse_update(br#"{"status":"deleted"}"#).is_err());
        assert!(parse_update(br#"{"scope":["all.Application"]}"#).is_err());
    }
}
