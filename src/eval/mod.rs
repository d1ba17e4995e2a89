//! Evaluations: perplexity and greedy generation.

pub mod generate;
pub mod ppl;
