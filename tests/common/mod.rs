//! Shared test helpers: fixture paths and the real model (skipped when absent).
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Read and parse a JSON fixture.
pub fn json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`$SWK_TEST_MODEL` or `.models/`), or `None`
/// with a message saying how to fetch it.
pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("SWK_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: real model not found at {} (run scripts/fetch-models.sh or set SWK_TEST_MODEL)",
            p.display()
        );
        None
    }
}

/// The loaded SmolLM2 model, shared by the tests of one binary.
pub fn smollm2_model() -> Option<&'static swk::Model> {
    use std::sync::OnceLock;
    static MODEL: OnceLock<Option<swk::Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            smollm2()
                .map(|p| swk::Model::load(p.to_str().expect("utf-8 path")).expect("load SmolLM2"))
        })
        .as_ref()
}

/// The `tokens` of a recorded reference (`reference.json`).
pub fn tokens(r: &serde_json::Value) -> Vec<u32> {
    r["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id") as u32).collect()
}

/// The `logits` rows of a recorded reference, flattened row by row.
pub fn logits(r: &serde_json::Value) -> Vec<f32> {
    r["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .flat_map(|row| {
            row.as_array().expect("row").iter().map(|v| v.as_f64().expect("f64") as f32)
        })
        .collect()
}

/// Largest |a - b| / max(|b|, floor) over two slices; infinite where either holds a NaN.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let err = |(x, y): (&f32, &f32)| (x - y).abs() / y.abs().max(floor);
    // f32::max skips NaN: a NaN or an infinity on either side counts as an infinite error.
    a.iter().zip(b).map(err).fold(0.0, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) })
}

/// Lay out a Hugging Face cache in `root` (as `HF_HOME/hub`) holding `files` (path in the
/// repository, bytes) of the data set repository `repo` at a fake revision.
pub fn hub_dataset_cache(root: &std::path::Path, repo: &str, files: &[(&str, Vec<u8>)]) {
    hub_cache(root, "datasets", repo, files);
}

/// The same for model repository `repo`; returns its snapshot directory.
pub fn hub_model_cache(root: &std::path::Path, repo: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    hub_cache(root, "models", repo, files)
}

fn hub_cache(root: &std::path::Path, kind: &str, repo: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = root.join(format!("{kind}--{}", repo.replace('/', "--")));
    let snap = dir.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(dir.join("refs")).expect("mkdir refs");
    std::fs::write(dir.join("refs/main"), "0123456789abcdef").expect("write ref");
    std::fs::create_dir_all(&snap).expect("mkdir snapshot");
    for (name, bytes) in files {
        let p = snap.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write file");
    }
    snap
}

/// A snappy-compressed parquet file with one required UTF-8 column `column`.
pub fn parquet_strings(column: &str, values: &[&str]) -> Vec<u8> {
    parquet_string_columns(&[(column, values)])
}

/// A snappy-compressed parquet file of required UTF-8 columns (equal lengths), one row group.
pub fn parquet_string_columns(columns: &[(&str, &[&str])]) -> Vec<u8> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let fields: String =
        columns.iter().map(|(c, _)| format!("REQUIRED BYTE_ARRAY {c} (UTF8); ")).collect();
    let schema = format!("message schema {{ {fields}}}");
    let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema).expect("schema"));
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(&mut buf, schema, props).expect("writer");
    let mut rg = w.next_row_group().expect("row group");
    for (_, values) in columns {
        let data: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(*s)).collect();
        let mut col = rg.next_column().expect("column").expect("a column");
        col.typed::<ByteArrayType>().write_batch(&data, None, None).expect("write");
        col.close().expect("close column");
    }
    rg.close().expect("close row group");
    w.close().expect("close file");
    buf
}

/// Decode the PNG at `path`: (width, height, RGB bytes), after checking its signature.
pub fn decode_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}: PNG signature", path.display());
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Pixels of an RGB buffer equal to `rgb`.
pub fn count_color(buf: &[u8], rgb: [u8; 3]) -> usize {
    buf.chunks_exact(3).filter(|p| *p == rgb).count()
}

/// A snappy-compressed parquet file shaped like the hub's ARC: `question`, `choices` (a struct
/// of two string lists, `text` and `label`, in the standard 3-level LIST layout) and
/// `answerKey`, one row per `(question, texts, labels, key)`.
pub fn parquet_arc(rows: &[(&str, &[&str], &[&str], &str)]) -> Vec<u8> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = "message schema {
        REQUIRED BYTE_ARRAY question (UTF8);
        REQUIRED group choices {
            REQUIRED group text (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
            REQUIRED group label (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
        }
        REQUIRED BYTE_ARRAY answerKey (UTF8);
    }";
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).expect("schema"));
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(&mut buf, schema, props).expect("writer");
    let mut rg = w.next_row_group().expect("row group");
    let (mut q, mut keys) = (Vec::new(), Vec::new());
    let (mut text, mut td, mut tr) = (Vec::new(), Vec::new(), Vec::new());
    let (mut label, mut ld, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    for (question, texts, labels, key) in rows {
        q.push(ByteArray::from(*question));
        keys.push(ByteArray::from(*key));
        for (i, t) in texts.iter().enumerate() {
            text.push(ByteArray::from(*t));
            td.push(1i16);
            tr.push(i16::from(i > 0));
        }
        for (i, l) in labels.iter().enumerate() {
            label.push(ByteArray::from(*l));
            ld.push(1i16);
            lr.push(i16::from(i > 0));
        }
    }
    type Levels = Option<(Vec<i16>, Vec<i16>)>;
    let columns: [(Vec<ByteArray>, Levels); 4] =
        [(q, None), (text, Some((td, tr))), (label, Some((ld, lr))), (keys, None)];
    for (data, lv) in &columns {
        let mut col = rg.next_column().expect("column").expect("a column");
        let (def, rep) = match lv {
            Some((d, r)) => (Some(d.as_slice()), Some(r.as_slice())),
            None => (None, None),
        };
        col.typed::<ByteArrayType>().write_batch(data, def, rep).expect("write");
        col.close().expect("close column");
    }
    rg.close().expect("close row group");
    w.close().expect("close file");
    buf
}
