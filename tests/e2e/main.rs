//! End-to-end tests: real RocksDB, real binaries, real object stores. One module per feature.

mod barrier;
mod capture;
mod chains;
mod clients;
mod cluster;
mod cluster_restore;
mod corruption;
mod disk_full;
mod encryption;
mod export;
mod faults;
mod gc;
mod hostile;
mod lifecycle;
mod lineage;
mod metrics;
mod model;
mod operations;
mod operator_faults;
mod pitr;
mod proxy;
mod round_trip;
mod security;
mod selective;
mod shipping;
