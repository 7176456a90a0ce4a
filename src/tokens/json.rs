//! A token record as the admin API shows it: times in RFC 3339, no hash,
//! and the secret only in the creation response. A view over the record,
//! serialised in place, not a copy of it.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::auth::TokenRecord;
use crate::timefmt::format_rfc3339;

pub struct TokenJson<'a> {
    pub record: &'a TokenRecord,
    /// The secret; given only in the creation response.
    pub secret: Option<&'a str>,
}

impl<'a> TokenJson<'a> {
    pub fn of(record: &'a TokenRecord) -> TokenJson<'a> {
        TokenJson {
            record,
            secret: None,
        }
    }
}

impl Serialize for TokenJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &r.id)?;
        m.serialize_entry("applicationId", &r.app)?;
        m.serialize_entry("name", &r.name)?;
        m.serialize_entry("scope", &r.scopes)?;
        m.serialize_entry("devices", &r.devices)?;
        m.serialize_entry("expirationDate", &r.expires_at.map(format_rfc3339))?;
        m.serialize_entry("status", &r.status)?;
        m.serialize_entry("deactivatedBy", &r.deactivated_by)?;
        m.serialize_entry("parentId", &r.parent_id)?;
        m.serialize_entry("createdAt", &format_rfc3339(r.created_at))?;
        m.serialize_entry("lastUsedAt", &r.last_used.map(format_rfc3339))?;
        m.serialize_entry("rateLimit", &r.rate_limit)?;
        if let Some(secret) = self.secret {
            m.serialize_entry("token", secret)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Devices, Revoker, Scope, Scopes, Status};
    use crate::secret::TokenHash;

    #[test]
    fn api_form() {
        let r = TokenRecord {
            id: "0a".into(),
            app: "farm".into(),
            name: "n".into(),
            scopes: Scopes::of(&[Scope::SendState]),
            devices: Devices::All,
            expires_at: None,
            status: Status::Inactive,
            deactivated_by: Some(Revoker::Token("09".into())),
            parent_id: Some("09".into()),
            created_at: 0,
            rate_limit: None,
            hash: TokenHash::of(b"sl_x"),
            last_used: Some(1000),
        };
        let v = serde_json::to_value(TokenJson::of(&r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "0a", "applicationId": "farm", "name": "n",
                "scope": ["device.sendState"], "devices": ["*"], "expirationDate": null,
                "status": "inactive", "deactivatedBy": "09", "parentId": "09",
                "createdAt": "1970-01-01T00:00:00.000Z", "lastUsedAt": "1970-01-01T00:00:01.000Z",
                "rateLimit": null
            })
        );
        let with = TokenJson {
            record: &r,
            secret: Some("sl_x"),
        };
        assert_eq!(serde_json::to_value(with).unwrap()["token"], "sl_x");
    }
}
