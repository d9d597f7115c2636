//! Host side of Kindling: the Runtime API server that guests poll, the Invoke API that
//! callers use, and the scheduler that owns execution environments.

pub mod environment;
