//! A small YAML tree with source positions, built from yaml-rust2's event parser.
//!
//! Only what a policy needs: scalars (with their quoting), sequences and mappings. Anchors,
//! aliases and tags are not part of the policy format; aliases are kept as [`Kind::Alias`] so
//! the checker can point at them.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One node of the tree, with the 1-based line and column where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub line: usize,
    pub col: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// A scalar; `quoted` when written in quotes or as a block scalar (never a number/bool/null).
    Scalar {
        value: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Alias,
}

impl Node {
    /// True for `~`, `null` and an empty plain scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, quoted: false }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// Short name of the node's type for messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { value, quoted } => {
                if *quoted {
                    "a string"
                } else if self.is_null() {
                    "an empty value"
                } else if matches!(value.as_str(), "true" | "false" | "True" | "False") {
                    "a boolean"
                } else if value.parse::<i64>().is_ok() || value.parse::<f64>().is_ok() {
                    "a number"
                } else {
                    "a string"
                }
            }
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
            Kind::Alias => "an alias",
        }
    }
}

/// A YAML syntax error, 1-based position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

enum Frame {
    Seq(Node, Vec<Node>),
    Map(Node, Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
}

fn pos(mark: Marker) -> (usize, usize) {
    (mark.line().max(1), mark.col() + 1)
}

impl Builder {
    fn push(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let (line, col) = pos(mark);
        let at = |kind| Node { line, col, kind };
        match ev {
            Event::Scalar(value, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push(at(Kind::Scalar { value, quoted }));
            }
            Event::Alias(_) => self.push(at(Kind::Alias)),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(at(Kind::Alias), Vec::new())),
            Event::MappingStart(..) => {
                self.stack
                    .push(Frame::Map(at(Kind::Alias), Vec::new(), None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(mut n, items)) => {
                        n.kind = Kind::Seq(items);
                        n
                    }
                    Some(Frame::Map(mut n, entries, _)) => {
                        // A block mapping's start event points past its first key.
                        if let Some((k, _)) = entries.first()
                            && (k.line, k.col) < (n.line, n.col)
                        {
                            (n.line, n.col) = (k.line, k.col);
                        }
                        n.kind = Kind::Map(entries);
                        n
                    }
                    None => return,
                };
                self.push(node);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Parse `source` into one document tree. `Ok(None)` for an empty stream.
pub(crate) fn parse(source: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut builder, true) {
        let (line, col) = pos(*e.marker());
        return Err(SyntaxError {
            line,
            col,
            message: format!("malformed YAML: {}", e.info()),
        });
    }
    let mut docs = builder.docs.into_iter();
    let first = docs.next();
    if let Some(second) = docs.next() {
        return Err(SyntaxError {
            line: second.line,
            col: second.col,
            message: "a policy file holds exactly one YAML document; remove the second `---` document or put it in its own file".into(),
        });
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() -> Result<(), SyntaxError> {
        let doc = parse("a: 1\nb:\n  - x\n  - {c: \"d\"}\n")?;
        let Some(Node {
            kind: Kind::Map(entries),
            ..
        }) = doc
        else {
            panic!("not a map");
        };
        assert_eq!((entries[0].0.line, entries[0].0.col), (1, 1));
        assert_eq!((entries[1].1.line, entries[1].1.col), (3, 3));
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!("not a seq")
        };
        assert_eq!((items[0].line, items[0].col), (3, 5));
        let Kind::Map(inner) = &items[1].kind else {
            panic!("not a map")
        };
        assert_eq!(
            inner[0].1.kind,
            Kind::Scalar {
                value: "d".into(),
                quoted: true
            }
        );
        assert_eq!((inner[0].1.line, inner[0].1.col), (4, 9));
        Ok(())
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").err();
        assert!(e.is_some());
        let e = parse("a: b\n c: d: e\n").err();
        assert!(matches!(e, Some(SyntaxError { line: 2, .. })), "{e:?}");
    }

    #[test]
    fn empty_and_multi() {
        assert_eq!(parse(""), Ok(None));
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }
}
