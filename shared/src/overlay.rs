//! Settings given as a JSON object laid over defaults, each bad field named: the one way a
//! job spec's or `--config` file's partial section (`[finetune]`, `[segmenter]`,
//! `[detector]`) becomes a whole typed configuration.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// `base` with the fields of `given` (a JSON object) laid over it. Every given value is first
/// tried alone over `base`, so that an unknown field or a value of the wrong type is refused
/// with that field named (without prefix; the caller adds its section). Not validated.
///
/// # Errors
/// `given` not an object (named `section`), an unknown field, a value of the wrong type.
pub fn overlay<T: Serialize + DeserializeOwned>(
    base: &T,
    given: Option<&serde_json::Value>,
    section: &str,
) -> Result<T> {
    let as_map = |t: &T| match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::invalid(section, "settings are not an object")),
        Err(e) => Err(Error::invalid(section, e.to_string())),
    };
    let mut whole = as_map(base)?;
    let Some(given) = given else {
        return parse(whole, section);
    };
    let serde_json::Value::Object(given) = given else {
        return Err(Error::invalid(
            section,
            format!("expected an object of {section} settings, found {given}"),
        ));
    };
    for (k, v) in given {
        let mut single = as_map(base)?;
        single.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<T>(serde_json::Value::Object(single)) {
            let reason = e.to_string();
            let reason = reason.split(" at line ").next().unwrap_or(&reason);
            return Err(Error::invalid(k.clone(), format!("{v}: {reason}")));
        }
        whole.insert(k.clone(), v.clone());
    }
    parse(whole, section)
}

fn parse<T: DeserializeOwned>(
    map: serde_json::Map<String, serde_json::Value>,
    section: &str,
) -> Result<T> {
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| Error::invalid(section, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SegmenterConfig;

    #[test]
    fn given_fields_replace_defaults_and_bad_ones_are_named() {
        let base = SegmenterConfig::tiny();
        let got: SegmenterConfig =
            overlay(&base, Some(&serde_json::json!({"n_skip": 2})), "segmenter").unwrap();
        assert_eq!((got.n_skip, got.resnet_width), (2, base.resnet_width));
        let named = |v: serde_json::Value| match overlay::<SegmenterConfig>(&base, Some(&v), "s") {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(named(serde_json::json!({"n_skip": "two"})), "n_skip");
        assert_eq!(named(serde_json::json!({"bogus": 1})), "bogus");
        assert_eq!(named(serde_json::json!([1])), "s");
    }
}
