//! The `lockstep.v1` protocol: `.proto` files, generated code and validated domain types.
//!
//! The gRPC services arrive with the barrier (issue 3); until then the crate holds no code.
