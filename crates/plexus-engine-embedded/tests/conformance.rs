//! The engine conformance suite (shared with every engine) on the embedded engine.

use std::sync::Arc;

use plexus_engine_embedded::EmbeddedEngine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_engine_conforms() {
    let dirs = std::sync::Mutex::new(Vec::new());
    let factory = |deliver| {
        let dir = tempfile::tempdir().unwrap();
        let engine = EmbeddedEngine::open(dir.path(), deliver).unwrap();
        dirs.lock().unwrap().push(dir);
        Arc::new(engine) as Arc<dyn plexus_core::Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}
