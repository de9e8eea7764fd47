//! Writing the XML the CPI hands libvirt (domains, disks, networks, DHCP
//! hosts, pools, volumes, the `bosh` metadata element): a small element tree
//! that escapes every attribute value and every text as it is written. There
//! is no way to put raw markup into it, so no value can reach libvirt
//! unescaped. Element and attribute names are the CPI's own constants.
//!
//! Escaping is quick-xml's (`<`, `>`, `&`, `'`, `"`), plus what libxml2 (the
//! parser libvirt uses) would otherwise change on reading: in an attribute
//! value tab, newline and carriage return become spaces (XML's attribute-value
//! normalisation), and in text a carriage return becomes a newline (line-end
//! normalisation), so those are written as character references. Characters
//! XML 1.0 cannot carry at all (other control characters, U+FFFE, U+FFFF)
//! are written as U+FFFD; requests carrying them are refused earlier (see
//! `method.rs` for metadata).
//!
//! Reading is `xmltree`'s job.

use std::fmt::Display;

/// One element: its name, attributes in order, and children (elements or text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct El {
    name: String,
    attrs: Vec<(String, String)>,
    content: Vec<Content>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    El(El),
    Text(String),
}

impl El {
    /// An element named `name` (a constant of the CPI, optionally with a
    /// namespace prefix: `disk`, `bosh:vm`).
    pub fn new(name: impl Into<String>) -> El {
        let name = name.into();
        debug_assert!(is_name(&name), "not an XML name: {name:?}");
        El {
            name,
            attrs: Vec::new(),
            content: Vec::new(),
        }
    }

    /// Adds `name='value'`; the value is escaped when written.
    pub fn attr(mut self, name: impl Into<String>, value: impl Display) -> El {
        let name = name.into();
        debug_assert!(is_name(&name), "not an XML name: {name:?}");
        self.attrs.push((name, value.to_string()));
        self
    }

    /// Adds the attribute when there is a value.
    pub fn attr_opt(self, name: impl Into<String>, value: Option<impl Display>) -> El {
        match value {
            Some(v) => self.attr(name, v),
            None => self,
        }
    }

    /// Appends a child element.
    pub fn child(mut self, child: El) -> El {
        self.content.push(Content::El(child));
        self
    }

    /// Appends child elements (an `Option<El>` is zero or one of them).
    pub fn children(mut self, children: impl IntoIterator<Item = El>) -> El {
        self.content.extend(children.into_iter().map(Content::El));
        self
    }

    /// Appends text; it is escaped when written.
    pub fn text(mut self, text: impl Display) -> El {
        self.content.push(Content::Text(text.to_string()));
        self
    }

    /// Appends `<name>text</name>`.
    pub fn text_child(self, name: impl Into<String>, text: impl Display) -> El {
        self.child(El::new(name).text(text))
    }

    /// The element on one line, as device and metadata fragments are passed.
    pub fn to_compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None);
        out
    }

    /// The element with one child element per line, indented by two spaces,
    /// as a whole document is defined (`virsh dumpxml` reads the same way).
    /// Elements holding text stay on one line.
    pub fn to_indented(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, Some(0));
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, depth: Option<usize>) {
        out.push('<');
        out.push_str(&self.name);
        for (name, value) in &self.attrs {
            out.push(' ');
            out.push_str(name);
            out.push_str("='");
            out.push_str(&escape_attr(value));
            out.push('\'');
        }
        if self.content.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        // Indentation only between elements: text is never padded.
        let indent = depth.filter(|_| self.content.iter().all(|c| matches!(c, Content::El(_))));
        for c in &self.content {
            match c {
                Content::El(el) => {
                    if let Some(d) = indent {
                        newline(out, d + 1);
                    }
                    el.write(out, indent.map(|d| d + 1));
                }
                Content::Text(t) => out.push_str(&escape_text(t)),
            }
        }
        if let Some(d) = indent {
            newline(out, d);
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', 2 * depth));
}

/// Letters, digits, `_`, `-`, `.` and one `:` between a prefix and a local
/// name, starting with a letter or `_`: the names this CPI writes.
fn is_name(name: &str) -> bool {
    let part = |p: &str| {
        p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    match name.split_once(':') {
        Some((prefix, local)) => part(prefix) && part(local),
        None => part(name),
    }
}

/// Whether XML 1.0 can carry the character at all (as itself or a reference).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn escape_attr(value: &str) -> String {
    escape(value, |c| match c {
        '\t' => Some("&#9;"),
        '\n' => Some("&#10;"),
        '\r' => Some("&#13;"),
        _ => None,
    })
}

fn escape_text(text: &str) -> String {
    escape(text, |c| (c == '\r').then_some("&#13;"))
}

fn escape(value: &str, whitespace: impl Fn(char) -> Option<&'static str>) -> String {
    let escaped = quick_xml::escape::escape(value);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        match whitespace(c) {
            Some(reference) => out.push_str(reference),
            None if is_xml_char(c) => out.push(c),
            None => out.push(char::REPLACEMENT_CHARACTER),
        }
    }
    out
}

/// Values an attacker (or an unlucky operator) may put into a name, a path,
/// a metadata key or value, a title: for the tests of every XML producer.
#[cfg(test)]
pub const HOSTILE: &[&str] = &[
    "a'b\"c",
    "</name><evil/>",
    "x' evil='1",
    "x\" evil=\"1",
    "<![CDATA[ ]]> ]]>",
    "&amp; &lt; & &#60; &unknown;",
    "line1\nline2\r\nline3\rend",
    "\ttabbed\t",
    "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>&e;",
    "--><!-- ",
    "ünïcødé ✓ 🦀",
    "",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xmltree::Element;

    #[test]
    fn hostile_values_round_trip_and_add_no_elements() {
        for v in HOSTILE {
            let el = El::new("outer")
                .attr("name", v)
                .child(El::new("inner").attr("a", v).text(v))
                .text_child("other", v);
            for xml in [el.to_compact(), el.to_indented()] {
                let root = Element::parse(&xml).unwrap_or_else(|e| panic!("{v:?}: {e}\n{xml}"));
                assert_eq!(
                    root.attrs,
                    vec![("name".to_string(), v.to_string())],
                    "{xml}"
                );
                let names: Vec<_> = root.children.iter().map(|c| c.name.as_str()).collect();
                assert_eq!(names, ["inner", "other"], "{xml}");
                let inner = &root.children[0];
                assert_eq!(inner.attrs, vec![("a".to_string(), v.to_string())]);
                assert!(inner.children.is_empty(), "{xml}");
                assert_eq!(inner.text, *v);
                assert_eq!(root.children[1].text, *v);
                assert!(root.children[1].children.is_empty());
            }
        }
    }

    #[test]
    fn whitespace_that_libxml2_would_normalise_is_written_as_references() {
        let xml = El::new("a")
            .attr("v", "1\t2\n3\r4")
            .text("x\ry\nz")
            .to_compact();
        assert_eq!(xml, "<a v='1&#9;2&#10;3&#13;4'>x&#13;y\nz</a>");
    }

    #[test]
    fn characters_xml_cannot_carry_become_replacement_characters() {
        let xml = El::new("a")
            .attr("v", "a\u{0}b")
            .text("\u{1b}[0m\u{FFFF}")
            .to_compact();
        assert_eq!(xml, "<a v='a\u{FFFD}b'>\u{FFFD}[0m\u{FFFD}</a>");
        assert!(Element::parse(&xml).is_ok());
    }

    #[test]
    fn layout() {
        let el = El::new("domain")
            .attr("type", "kvm")
            .text_child("name", "vm-1")
            .child(El::new("devices").child(El::new("disk").attr("type", "file")))
            .attr_opt("id", None::<&str>)
            .children(None);
        assert_eq!(
            el.to_indented(),
            "<domain type='kvm'>\n  <name>vm-1</name>\n  <devices>\n    <disk type='file'/>\n  </devices>\n</domain>\n"
        );
        assert_eq!(
            el.to_compact(),
            "<domain type='kvm'><name>vm-1</name><devices><disk type='file'/></devices></domain>"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(is_name("bosh:vm") && is_name("xmlns:bosh") && is_name("on_poweroff"));
        assert!(!is_name("a b") && !is_name("a>") && !is_name("") && !is_name("1a"));
        assert!(!is_name("a:b:c"));
    }
}
