//! Placeholder: property tests are being written.
