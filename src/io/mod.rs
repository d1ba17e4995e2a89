//! Reading model files: GGUF, safetensors, the Hugging Face cache, tokenizers.

pub mod gguf;
pub mod hub;
pub mod quant;
pub mod safetensors;
pub mod tokenizer;
