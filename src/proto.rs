//! Generated gRPC types for `leash.v1`.

#![allow(clippy::all, missing_docs)]

/// The `leash.v1` package: `Authorizer` service, requests and responses.
pub mod v1 {
    tonic::include_proto!("leash.v1");
}

/// The `leash.bench.v1` package: the empty `Floor` service `leash bench`
/// measures leash against. Never served by the sidecar.
pub mod bench {
    pub mod v1 {
        tonic::include_proto!("leash.bench.v1");
    }
}

/// The encoded file descriptor set of `leash.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/leash_descriptor.bin"));
