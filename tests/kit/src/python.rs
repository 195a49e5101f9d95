//! The Python interpreter of the project's virtual environment, which
//! `cargo xtask setup` creates at `.venv/` in the workspace and fills with
//! the independent implementations the tests check against (PyJWT, the
//! OCSF schema models, the Kubernetes schemas). The system interpreter is
//! never used, so nothing is installed into it.

use std::path::PathBuf;

/// `$PORTCULLIS_PYTHON` when set, else `.venv/bin/python3` at the
/// workspace root.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python3")
}

/// Panics with the fix when the environment is missing.
pub fn require_python() -> PathBuf {
    let p = python();
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup`, which creates the project's Python environment",
        p.display()
    );
    p
}
