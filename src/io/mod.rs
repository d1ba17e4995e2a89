//! Reading model files (GGUF, safetensors, the Hugging Face cache, tokenizers) and data set
//! files (parquet, JSON Lines).

pub mod gguf;
pub mod hub;
pub mod jsonl;
pub mod parquet;
pub mod quant;
pub mod safetensors;
pub mod tokenizer;
