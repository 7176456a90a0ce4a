//! The complete description of one token. It is what the registry is given
//! and hands back, what the admin API shows (see `tokens::TokenJson`), and,
//! serialised as JSON, what the store keeps under the token's id: changing
//! a field's name here changes the stored format.

use serde::{Deserialize, Serialize};

use super::grant::{Devices, RateLimit};
use super::scope::Scopes;
use super::status::{Revoker, Status};
use crate::secret::TokenHash;

/// One token. Holds the secret's SHA-256, never the secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    #[serde(rename = "applicationId")]
    pub app: String,
    pub name: String,
    #[serde(rename = "scope")]
    pub scopes: Scopes,
    pub devices: Devices,
    /// Epoch milliseconds after which the token is unusable.
    #[serde(rename = "expirationDate")]
    pub expires_at: Option<i64>,
    /// The token's own status; whether it is usable also depends on every
    /// ancestor's.
    pub status: Status,
    /// Who deactivated it, while it is inactive (absent in records written
    /// before revocation had an authority).
    #[serde(default)]
    pub deactivated_by: Option<Revoker>,
    /// The token that minted it; `None` when the root admin token did.
    pub parent_id: Option<String>,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub rate_limit: Option<RateLimit>,
    #[serde(rename = "sha256", with = "hash_hex")]
    pub hash: TokenHash,
    /// Last use, epoch milliseconds. The store keeps it apart from the
    /// record, so the periodic flush rewrites 8 bytes, not the record.
    #[serde(skip)]
    pub last_used: Option<i64>,
}

/// The hash as 64 lowercase hex digits.
mod hash_hex {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::secret::TokenHash;

    pub fn serialize<S: Serializer>(h: &TokenHash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TokenHash, D::Error> {
        let s = String::deserialize(d)?;
        TokenHash::from_hex(&s).ok_or_else(|| D::Error::custom("`sha256` is not 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::scope::Scope;
    use super::*;

    #[test]
    fn stored_form_round_trips_and_reads_older_records() {
        let r = TokenRecord {
            id: "0a".into(),
            app: "farm".into(),
            name: "n".into(),
            scopes: Scopes::of(&[Scope::SendState, Scope::TokenCreate]),
            devices: Devices::only(["d2".to_string(), "d1".to_string()]),
            expires_at: Some(5),
            status: Status::Inactive,
            deactivated_by: Some(Revoker::Root),
            parent_id: Some("09".into()),
            created_at: 3,
            rate_limit: Some(RateLimit {
                per_second: 1,
                burst: 2,
            }),
            hash: TokenHash::of(b"sl_x"),
            last_used: None,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<TokenRecord>(&text).unwrap(), r);
        assert!(
            text.contains(r#""scope":["device.sendState","token.create"]"#),
            "{text}"
        );
        assert!(text.contains(r#""deactivatedBy":"root""#), "{text}");
        assert!(!text.contains("lastUsed"), "{text}");
        // A record as the first versions wrote it: no `deactivatedBy`.
        let old = format!(
            r#"{{"id":"a","applicationId":"farm","name":"n","scope":["device.sendState"],"devices":["*"],"expirationDate":null,"status":"active","parentId":null,"createdAt":1,"rateLimit":null,"sha256":"{}"}}"#,
            TokenHash::of(b"sl_y").to_hex()
        );
        let rec: TokenRecord = serde_json::from_str(&old).unwrap();
        assert_eq!((rec.devices, rec.deactivated_by), (Devices::All, None));
    }
}
