//! What the end-to-end tests share, and the two programs that exist only
//! for demos and tests; none of it is part of a release.
//!
//! - [`e2e`]: an agent in a namespace topology with a config, its one-shot
//!   subcommands, and the knock setup (`tests/e2e_*.rs`);
//! - [`devtoken`]: a development token issuer (`portcullis-devtoken`);
//! - [`demo`]: the self-contained demo (`portcullis-demo`);
//! - [`fleet`]: several nodes, one client, one collector (`portcullis-fleet`);
//! - [`story`]: how the demo and the fleet narrate and check their steps;
//! - [`pipeline`]: the knock path in process, for tests and benchmarks.
//!
//! The namespace harness itself is `portcullis-testkit` (`tests/kit`).

pub mod demo;
pub mod devtoken;
pub mod e2e;
pub mod fleet;
pub mod pipeline;
pub mod pki;
pub mod story;
