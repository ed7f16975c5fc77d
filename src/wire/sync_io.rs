//! The blocking-style stream tungstenite's context reads from and writes to, over the connection's async socket,
//! inside one poll of the connection's task.

use std::{
    io::{self, Read, Write},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

use super::MAX_CONTROL_BYTES;
use crate::frames::FrameMeter;

/// The blocking-style stream tungstenite reads from: reads poll the socket (`Pending` becomes `WouldBlock`, with the
/// waker registered) and charge the frames they bring; writes (pongs, the close reply) go to the control buffer.
pub(super) struct SyncIo<'a, 'b, IO> {
    pub(super) io: &'a mut IO,
    pub(super) cx: &'a mut Context<'b>,
    pub(super) meter: &'a mut FrameMeter,
    pub(super) control: &'a mut Vec<u8>,
}

impl<IO: AsyncRead + Unpin> Read for SyncIo<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.meter.abusive() {
            return Err(io::Error::other("rate limit exceeded repeatedly"));
        }
        let mut read = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if !self.meter.charge(read.filled_mut()) {
                    return Err(io::Error::other("rate limit exceeded repeatedly"));
                }
                Ok(n)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<IO> Write for SyncIo<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.control.len() >= MAX_CONTROL_BYTES {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.control.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
