//! The bytes this engine puts in Redis besides `Publication::to_stored()` are those of
//! `plexus_core::envelope` (shared with every broker engine): the pub/sub envelope on
//! `{prefix}:pub:{channel}` — which the publish script also writes — client descriptors in
//! presence, and node commands on `{prefix}:control`.

pub use plexus_core::envelope::*;
