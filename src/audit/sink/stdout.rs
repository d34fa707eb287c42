//! JSON lines on standard output.

use std::io::{self, Write};

use super::LineSink;

pub(crate) struct StdoutSink {
    out: io::Stdout,
}

impl StdoutSink {
    pub(crate) fn new() -> StdoutSink {
        StdoutSink { out: io::stdout() }
    }
}

impl LineSink for StdoutSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        // One locked write per line, so lines never interleave with other output.
        self.out.lock().write_all(line)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.lock().flush()
    }
}
