//! Azure's public Service Tags JSON (`ServiceTags_Public_*.json`) → a table of tag name → prefixes.
//!
//! Takes text, returns values: no fetching, no files. Tag names are looked up ignoring case, on the
//! name itself (`Storage.WestUS2`), never on the file's `region` field, which spells some regions
//! differently (`FranceCentral` is `centralfrance` there).

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;

/// Every tag in one Service Tags file.
#[derive(Clone, Debug, Default)]
pub struct TagTable {
    /// Lower-cased tag name → (name as published, prefixes).
    tags: BTreeMap<String, (String, Vec<IpNet>)>,
    change_number: u64,
    cloud: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("not a Service Tags file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("tag {tag:?}: invalid address prefix {prefix:?}")]
    Prefix { tag: String, prefix: String },
    #[error("the file lists no tags")]
    Empty,
}

impl TagTable {
    pub fn parse(text: &str) -> Result<Self, TagError> {
        let file: File = serde_json::from_str(text)?;
        if file.values.is_empty() {
            return Err(TagError::Empty);
        }
        let mut tags = BTreeMap::new();
        for v in file.values {
            let mut prefixes = Vec::with_capacity(v.properties.address_prefixes.len());
            for p in &v.properties.address_prefixes {
                let net: IpNet = p.parse().map_err(|_| TagError::Prefix { tag: v.name.clone(), prefix: p.clone() })?;
                prefixes.push(net);
            }
            tags.insert(v.name.to_ascii_lowercase(), (v.name, prefixes));
        }
        Ok(Self { tags, change_number: file.change_number, cloud: file.cloud })
    }

    /// The prefixes of a tag, looked up ignoring case, with the name as Azure spells it.
    pub fn get(&self, name: &str) -> Option<(&str, &[IpNet])> {
        self.tags.get(&name.to_ascii_lowercase()).map(|(n, p)| (n.as_str(), p.as_slice()))
    }

    /// Every tag, as Azure spells it, with its prefixes, in case-insensitive order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[IpNet])> {
        self.tags.values().map(|(n, p)| (n.as_str(), p.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    pub fn change_number(&self) -> u64 {
        self.change_number
    }

    pub fn cloud(&self) -> &str {
        &self.cloud
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    change_number: u64,
    #[serde(default)]
    cloud: String,
    values: Vec<Value>,
}

#[derive(Deserialize)]
struct Value {
    name: String,
    properties: Properties,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Properties {
    address_prefixes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBSET: &str = include_str!("../../tests/data/ServiceTags_Public_20251020.azureml-subset.json");

    #[test]
    fn reads_the_real_subset_file() {
        let t = TagTable::parse(SUBSET).unwrap();
        assert_eq!(t.len(), 23);
        assert_eq!(t.change_number(), 374);
        assert_eq!(t.cloud(), "Public");
        let (name, prefixes) = t.get("storage.westus2").unwrap();
        assert_eq!((name, prefixes.len()), ("Storage.WestUS2", 52));
        assert_eq!(t.get("STORAGE.FRANCECENTRAL").map(|(_, p)| p.len()), Some(17));
        assert!(t.get("Storage.centralfrance").is_none(), "the region field is never a name");
        let total: usize = t.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(total, 2430);
    }

    #[test]
    fn refuses_broken_files() {
        assert!(matches!(TagTable::parse("{}"), Err(TagError::Json(_))));
        assert!(matches!(TagTable::parse(r#"{"changeNumber":1,"values":[]}"#), Err(TagError::Empty)));
        let bad = r#"{"changeNumber":1,"values":[{"name":"X","properties":{"addressPrefixes":["1.2.3.4/33"]}}]}"#;
        assert!(matches!(TagTable::parse(bad), Err(TagError::Prefix { .. })));
    }
}
