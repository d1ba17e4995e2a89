//! Evaluations: perplexity (on a text file or a hub data set) and greedy generation.

pub mod dataset;
pub mod generate;
pub mod ppl;
