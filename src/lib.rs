//! swk, the super weight kit: find, measure and edit super weights in large language models.
//!
//! Data flows one way: bytes ([`io`]) → weights ([`model`]) → forward pass ([`model::arch`])
//! → hooks and spike statistics ([`hooks`]) → perplexity and generation ([`eval`]).
#![warn(missing_docs)]

pub mod analysis;
pub mod backend;
pub mod catalog;
pub mod confirm;
pub mod detect;
pub mod detect_report;
pub mod edit;
pub mod error;
pub mod eval;
pub mod hooks;
pub mod io;
pub mod model;
pub mod report;
pub mod synth;

pub use error::{Error, Result};
pub use model::Model;
