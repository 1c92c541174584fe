//! End-to-end tests: real RocksDB, real binaries, real object stores. One module per feature.

mod capture;
mod corruption;
mod disk_full;
mod model;
mod round_trip;
