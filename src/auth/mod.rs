//! Authentication and authorization. This module does no IO: it is the
//! in-memory token set, the hot-path check, the attenuation rule and the
//! revocation authority, so it can be tested and fuzzed alone. Persistence
//! lives in `tokens`.

pub mod attenuation;
pub mod grant;
mod hot;
pub mod rate;
pub mod record;
pub mod registry;
pub mod scope;
pub mod status;
pub mod token;

pub use attenuation::{attenuate, Exceeds, Granted, Requested};
pub use grant::{Devices, RateLimit};
pub use hot::Hit;
pub use rate::{monotonic_ns, monotonic_ns_of, Limiter};
pub use record::TokenRecord;
pub use registry::{Registry, RegistryError};
pub use scope::{Scope, Scopes};
pub use status::{status_change, AuthorityError, Revoker, Status};
pub use token::{Denied, TokenEntry};
