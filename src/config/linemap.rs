//! A map from field path (`listener.clientCertificateBundles[1].name`) to where that field is
//! written in the YAML source, so that errors found after parsing can still cite a line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column of each field path in one YAML document.
#[derive(Clone, Debug, Default)]
pub struct LineMap {
    positions: HashMap<String, (usize, usize)>,
}

impl LineMap {
    /// Builds the map from the first document of `src`. A source that does not parse gives an
    /// empty (or partial) map; the YAML error itself is reported by the deserializer.
    pub fn build(src: &str) -> LineMap {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(src);
        let _ = parser.load(&mut builder, false);
        LineMap {
            positions: builder.positions,
        }
    }

    /// Where `path` is written; for a path that is not in the file (a field left to its
    /// default, or a missing required field), where its nearest written ancestor is.
    pub fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            p = parent(p)?;
        }
    }

    /// Where exactly `path` is written, without falling back to an ancestor.
    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<(usize, usize)> {
        self.positions.get(path).copied()
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> None.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    /// A mapping at `path`; `key` is the pending key whose value comes next, if any.
    /// `item` is set for a mapping that is a list item, whose position is that of its first
    /// key (a block mapping's start event points past it).
    Map {
        path: String,
        key: Option<String>,
        item: bool,
    },
    /// A sequence at `path`; `index` is the index of the next item.
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
    /// Set once the first document has ended; later documents are ignored.
    done: bool,
}

impl Builder {
    fn record(&mut self, path: String, mark: &Marker) {
        // yaml-rust2 lines are 1-based, columns 0-based.
        self.positions
            .entry(path)
            .or_insert((mark.line(), mark.col() + 1));
    }

    /// The path of a node that starts now, if it is a value (not a mapping key).
    fn value_path(&mut self, mark: &Marker, record_item: bool) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map {
                path, key: Some(k), ..
            }) => Some(join(path, k)),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                if record_item {
                    self.record(p.clone(), mark);
                }
                Some(p)
            }
        }
    }

    /// A node has ended: advance the enclosing container.
    fn node_done(&mut self, scalar_key: Option<(String, &Marker)>) {
        let mut record = None;
        let mut item_record = None;
        match self.stack.last_mut() {
            Some(Frame::Map { path, key, item }) => {
                if key.is_none() {
                    let k = scalar_key
                        .as_ref()
                        .map_or_else(|| "?".to_string(), |(k, _)| k.clone());
                    if let Some((_, mark)) = &scalar_key {
                        if *item {
                            item_record = Some((path.clone(), **mark));
                            *item = false;
                        }
                        record = Some((join(path, &k), **mark));
                    }
                    *key = Some(k);
                } else {
                    *key = None;
                }
            }
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
        for (p, mark) in [item_record, record].into_iter().flatten() {
            self.record(p, &mark);
        }
    }

    fn start_container(&mut self, mark: &Marker, seq: bool) {
        let item = matches!(self.stack.last(), Some(Frame::Seq { .. }));
        // A container used as a mapping key gets a placeholder path.
        let path = self
            .value_path(mark, seq || !item)
            .unwrap_or_else(|| "?".to_string());
        self.stack.push(if seq {
            Frame::Seq { path, index: 0 }
        } else {
            Frame::Map {
                path,
                key: None,
                item,
            }
        });
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.done {
            return;
        }
        match ev {
            Event::Scalar(value, ..) => {
                if self.value_path(&mark, true).is_some() {
                    self.node_done(None);
                } else {
                    self.node_done(Some((value, &mark)));
                }
            }
            Event::Alias(_) => {
                if self.value_path(&mark, true).is_some() {
                    self.node_done(None);
                } else {
                    self.node_done(Some(("*".to_string(), &mark)));
                }
            }
            Event::MappingStart(..) => self.start_container(&mark, false),
            Event::SequenceStart(..) => self.start_container(&mark, true),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.node_done(None);
            }
            Event::DocumentEnd => self.done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
a: 1
b:
  c: x
  list:
    - name: one
      v: 1
    - name: two
    - [p, q]
  flow: {k: v}
d: [1, {e: 2}]
";

    #[test]
    fn maps_paths_to_lines() {
        let m = LineMap::build(SRC);
        assert_eq!(m.get("a"), Some((1, 1)));
        assert_eq!(m.get("b"), Some((2, 1)));
        assert_eq!(m.get("b.c"), Some((3, 3)));
        assert_eq!(m.get("b.list"), Some((4, 3)));
        assert_eq!(m.get("b.list[0]"), Some((5, 7)));
        assert_eq!(m.get("b.list[0].name"), Some((5, 7)));
        assert_eq!(m.get("b.list[0].v"), Some((6, 7)));
        assert_eq!(m.get("b.list[1].name"), Some((7, 7)));
        assert_eq!(m.get("b.list[2][1]").map(|p| p.0), Some(8));
        assert_eq!(m.get("b.flow.k").map(|p| p.0), Some(9));
        assert_eq!(m.get("d[1].e").map(|p| p.0), Some(10));
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        let m = LineMap::build(SRC);
        assert_eq!(m.locate("b.list[1].caFile"), Some((7, 7)));
        assert_eq!(m.locate("b.missing.deeper"), Some((2, 1)));
        assert_eq!(m.locate("zzz"), None);
    }

    #[test]
    fn broken_yaml_gives_a_partial_map() {
        let m = LineMap::build("a: 1\nb: [\n");
        assert_eq!(m.get("a"), Some((1, 1)));
    }
}
