//! A small read-only element tree over libvirt's XML (domain, network and
//! volume descriptions), enough to pick out devices, attributes and our
//! metadata element. Writing is `xmlwrite`'s.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// The qualified name as written (`bosh:vm`, `disk`).
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    /// Concatenated, unescaped text directly inside this element.
    pub text: String,
}

impl Element {
    pub fn parse(xml: &str) -> Result<Element, String> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        loop {
            let event = reader
                .read_event()
                .map_err(|e| format!("XML error at byte {}: {e}", reader.buffer_position()))?;
            match event {
                Event::Start(start) => stack.push(element_of(&start)?),
                Event::Empty(start) => {
                    let el = element_of(&start)?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => return Ok(el),
                    }
                }
                Event::End(_) => {
                    let el = stack.pop().ok_or("unbalanced end tag")?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => return Ok(el),
                    }
                }
                Event::Text(t) => {
                    if let Some(top) = stack.last_mut() {
                        let text = t.unescape().map_err(|e| format!("XML text: {e}"))?;
                        top.text.push_str(&text);
                    }
                }
                Event::CData(c) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&String::from_utf8_lossy(&c.into_inner()));
                    }
                }
                Event::Eof => return Err("XML ended before its root element was closed".into()),
                _ => {}
            }
        }
    }

    /// The name without its namespace prefix.
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn child(&self, local_name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local_name() == local_name)
    }

    pub fn children_named<'a>(
        &'a self,
        local_name: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children
            .iter()
            .filter(move |c| c.local_name() == local_name)
    }

    /// Follows a path of local names from this element.
    pub fn at(&self, path: &[&str]) -> Option<&Element> {
        path.iter().try_fold(self, |el, name| el.child(name))
    }

    /// Whether this element's own prefix is bound to `uri` on the element
    /// itself (libvirt always declares the namespace of a metadata element on it).
    pub fn in_namespace(&self, uri: &str) -> bool {
        let decl = match self.name.split_once(':') {
            Some((prefix, _)) => format!("xmlns:{prefix}"),
            None => "xmlns".to_string(),
        };
        self.attr(&decl) == Some(uri)
    }

    pub fn text_trimmed(&self) -> &str {
        self.text.trim()
    }

    /// The trimmed text of the element at `path`; `None` when that element is
    /// absent or holds no text at all (`<x/>`, `<x></x>`).
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        self.at(path)
            .filter(|el| !el.text.is_empty())
            .map(Element::text_trimmed)
    }
}

fn element_of(start: &BytesStart) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in start.attributes() {
        let a = a.map_err(|e| format!("XML attribute in <{name}>: {e}"))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a
            .unescape_value()
            .map_err(|e| format!("XML attribute {key} in <{name}>: {e}"))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_elements_attributes_and_text() {
        let xml = r#"<?xml version="1.0"?>
<domain type='qemu'><name>vm-1</name>
  <metadata><bosh:vm xmlns:bosh="urn:x"><agent_id>a &amp; b</agent_id></bosh:vm></metadata>
  <devices><interface type='network'><mac address='52:54:00:00:00:01'/><source network='n'/></interface>
  <interface type='network'><mac address='52:54:00:00:00:02'/></interface></devices></domain>"#;
        let d = Element::parse(xml).unwrap();
        assert_eq!(d.name, "domain");
        assert_eq!(d.attr("type"), Some("qemu"));
        assert_eq!(d.child("name").unwrap().text, "vm-1");
        let vm = d.at(&["metadata", "vm"]).unwrap();
        assert!(vm.in_namespace("urn:x"));
        assert!(!vm.in_namespace("urn:y"));
        assert_eq!(vm.child("agent_id").unwrap().text, "a & b");
        let macs: Vec<_> = d
            .child("devices")
            .unwrap()
            .children_named("interface")
            .filter_map(|i| i.child("mac").and_then(|m| m.attr("address")))
            .collect();
        assert_eq!(macs, ["52:54:00:00:00:01", "52:54:00:00:00:02"]);
        assert_eq!(d.text_at(&["name"]), Some("vm-1"));
        assert_eq!(d.text_at(&["devices"]).map(str::is_empty), Some(true));
        assert_eq!(d.text_at(&["metadata", "vm", "nope"]), None);
        assert_eq!(Element::parse("<a><b/></a>").unwrap().text_at(&["b"]), None);
        assert!(Element::parse("<a><b></a>").is_err());
        assert!(Element::parse("<a>").is_err());
    }
}
