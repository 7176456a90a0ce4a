//! Credentials as they arrive: `secret::parse_bearer` (HTTP
//! Authorization), `plausible_credential` (MQTT password), `TokenHash`
//! hex and hashing, and `auth::Registry::authorize` with the credential.
//! A credential other than an inserted secret must be Unauthorized.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice::auth::{Denied, Devices, TokenRecord, Registry, Scope, Scopes, Status};
use sluice::secret::{parse_bearer, plausible_credential, TokenHash, MAX_PRESENTED_LEN};

/// Active parent (every device), its child (two devices), an inactive
/// token and a root; the seeds hold their secrets.
const PARENT: &[u8] = b"sl_fuzzParentfuzzParentfuzzParentfuzzParent0";
const CHILD: &[u8] = b"sl_fuzzChildfuzzChildfuzzChildfuzzChildfuzz0";
const INACTIVE: &[u8] = b"sl_fuzzInactivefuzzInactivefuzzInactivefuz0";
const ROOT: &[u8] = b"sl_fuzzRootfuzzRootfuzzRootfuzzRootfuzzRoot0";
const NOW: i64 = 1_700_000_000_000;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let r = Registry::new();
        let tok = |id: &str, parent: Option<&str>, devices: Devices, status, secret: &[u8]| TokenRecord {
            id: id.into(),
            app: "app".into(),
            name: id.into(),
            scopes: Scopes::of(&[Scope::SendState, Scope::GetState]),
            devices,
            expires_at: Some(NOW + 1_000_000),
            status,
            parent_id: parent.map(String::from),
            created_at: 0,
            last_used: None,
            deactivated_by: None,
            rate_limit: None,
            hash: TokenHash::of(secret),
        };
        r.insert(tok("p", None, Devices::All, Status::Active, PARENT)).unwrap();
        let two = Devices::only(["dev1".to_string(), "dev-2".to_string()]);
        r.insert(tok("c", Some("p"), two, Status::Active, CHILD)).unwrap();
        r.insert(tok("i", None, Devices::All, Status::Inactive, INACTIVE)).unwrap();
        r.set_root(TokenHash::of(ROOT));
        r
    })
}

fn check_authorize(cred: &[u8], sel: u8) {
    let r = registry();
    let device = match sel % 4 {
        0 => Some("dev1"),
        1 => Some("dev-2"),
        2 => Some("other"),
        _ => None,
    };
    let app = if sel & 0x10 == 0 { "app" } else { "other-app" };
    let scope = if sel & 0x20 == 0 { Scope::SendState } else { Scope::TokenCreate };
    // Past the expiry of the application tokens when bit 6 is set.
    let now = if sel & 0x40 == 0 { NOW } else { NOW + 2_000_000 };
    let got = r.authorize(cred, app, device, scope, now);
    let known = [PARENT, CHILD, ROOT].contains(&cred);
    if !known {
        assert_eq!(got, Err(Denied::Unauthorized), "unknown credential was not Unauthorized");
        assert!(r.authenticate(cred, now).is_err());
    } else if cred == ROOT {
        assert_eq!(got, Ok(()), "root must be allowed everything");
    } else if now > NOW + 1_000_000 {
        assert_eq!(got, Err(Denied::Unauthorized), "expired token accepted");
    } else {
        let covered = cred == PARENT || !matches!(device, Some("other"));
        let want = if app == "app" && scope == Scope::SendState && covered {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        };
        assert_eq!(got, want, "wrong answer for a known token");
    }
}

fuzz_target!(|data: &[u8]| {
    let sel = data.first().copied().unwrap_or(0);

    // HTTP: the Authorization header value.
    let bearer = parse_bearer(data);
    if let Some(tok) = bearer {
        assert!(plausible_credential(tok));
        assert!(!tok.is_empty() && tok.len() <= MAX_PRESENTED_LEN);
        // The credential is a sub-slice of the header.
        let start = tok.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + tok.len() <= data.len());
        check_authorize(tok, sel);
    }

    // MQTT: the password as sent.
    if plausible_credential(data) {
        assert!(data.iter().all(|c| c.is_ascii_graphic()));
        check_authorize(data, sel);
        // A plausible credential behind "Bearer " is found again.
        let mut h = b"Bearer ".to_vec();
        h.extend_from_slice(data);
        assert_eq!(parse_bearer(&h), Some(data));
    } else {
        // The server refuses these before hashing; the registry must
        // still cope if one got through.
        let _ = registry().authorize(data, "app", Some("dev1"), Scope::SendState, NOW);
    }

    // Hashes: hex round trip, both ways.
    let h = TokenHash::of(data);
    assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(h) = TokenHash::from_hex(s) {
            assert_eq!(h.to_hex(), s, "from_hex accepted non-canonical hex");
        }
    }
    let _ = format!("{h:?}");
});
