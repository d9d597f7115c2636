//! The namespace sandbox environment.
