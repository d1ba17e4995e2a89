//! Rows of a parquet file (the hub's data set format) as JSON objects, through the parquet
//! crate's record reader (no arrow). Nested columns (lists, structs) become JSON arrays and
//! objects, so a parquet row reads like the same row of the data set's JSONL.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::Value;

use crate::{Error, Result};

/// Every row of the parquet file at `path`, in file order, as a JSON object.
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: parquet::errors::ParquetError| Error::format(path, format!("parquet: {e}"));
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    rows.map(|r| r.map(|row| row_json(&row)).map_err(bad)).collect()
}

fn row_json(row: &Row) -> Value {
    Value::Object(row.get_column_iter().map(|(k, f)| (k.clone(), field_json(f))).collect())
}

/// A parquet value as JSON: strings, numbers, booleans, lists and structs as themselves;
/// maps as objects with stringified keys; anything else (bytes, dates, decimals) as its
/// display string.
fn field_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float(x) => (*x as f64).into(),
        Field::Double(x) => (*x).into(),
        Field::Float16(x) => (x.to_f64()).into(),
        Field::Str(s) => Value::String(s.clone()),
        Field::Group(row) => row_json(row),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_json(v))
                })
                .collect(),
        ),
        other => Value::String(other.to_string()),
    }
}
