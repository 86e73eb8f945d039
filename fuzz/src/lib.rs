//! Nothing here: the fuzz targets are `tests/decoders.rs` (see there for how they run).
