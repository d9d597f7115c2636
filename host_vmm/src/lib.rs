//! A compact KVM VMM.
