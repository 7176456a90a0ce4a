//! Authentication and authorization. This module does no IO: it is the
//! in-memory token set, the hot-path check and the attenuation rule, so it
//! can be tested and fuzzed alone. Persistence lives in `tokens`.

pub mod attenuation;
pub mod rate;
pub mod registry;
pub mod scope;
pub mod token;

pub use attenuation::{attenuate, Exceeds, Granted, Requested};
pub use rate::{monotonic_ns, Limiter};
pub use registry::{NewToken, Registry, RegistryError, TokenView};
pub use scope::{Scope, Scopes};
pub use token::{Denied, Devices, RateLimit, Status, TokenEntry};
