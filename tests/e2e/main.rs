//! End-to-end tests: real RocksDB, real binaries, real object stores. One module per feature.

mod barrier;
mod capture;
mod clients;
mod cluster;
mod corruption;
mod disk_full;
mod faults;
mod model;
mod round_trip;
