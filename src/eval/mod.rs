//! Evaluations: perplexity (on a text file or a hub data set), zero-shot multiple choice and
//! greedy generation.

pub mod choice;
pub mod dataset;
pub mod generate;
pub mod logits;
pub mod ppl;
