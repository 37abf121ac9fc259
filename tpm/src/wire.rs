//! TPM 2.0 wire format: big-endian commands and responses (TPM 2.0 Part 1, §18; Part 3 for each
//! command's layout).

use crate::TpmError;

/// `TPM_ST_NO_SESSIONS`.
pub const NO_SESSIONS: u16 = 0x8001;
/// `TPM_ST_SESSIONS`.
pub const SESSIONS: u16 = 0x8002;
/// `TPM_RS_PW`: the password session (empty password).
pub const RS_PW: u32 = 0x4000_0009;

/// A command being built.
pub struct Cmd {
    buf: Vec<u8>,
    cc: u32,
}

impl Cmd {
    /// A command with `tag` and command code `cc`.
    pub fn new(tag: u16, cc: u32) -> Cmd {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&tag.to_be_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&cc.to_be_bytes());
        Cmd { buf, cc }
    }

    /// Appends a byte.
    pub fn u8(mut self, v: u8) -> Cmd {
        self.buf.push(v);
        self
    }

    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Cmd {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Cmd {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn raw(mut self, v: &[u8]) -> Cmd {
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends a `TPM2B`: u16 size, then the bytes.
    pub fn tpm2b(self, v: &[u8]) -> Cmd {
        self.u16(v.len() as u16).raw(v)
    }

    /// Appends an authorization area with the empty password session.
    pub fn password_auth(self) -> Cmd {
        self.u32(9).u32(RS_PW).u16(0).u8(0).u16(0)
    }

    /// Appends an authorization area with policy session `session` (no HMAC: the session is
    /// unbound and unsalted, and the object has no auth value).
    pub fn policy_auth(self, session: u32) -> Cmd {
        self.u32(9).u32(session).u16(0).u8(0).u16(0)
    }

    /// The command code.
    pub fn code(&self) -> u32 {
        self.cc
    }

    /// The finished bytes (size filled in).
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[2..6].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// A response being read.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads `b`.
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }

    /// Where the next byte is, from the start of the response.
    pub fn position(&self) -> usize {
        self.at
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(TpmError::Malformed("the response ended early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.bytes(1)?[0])
    }

    /// A u16.
    pub fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A u32.
    pub fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `TPM2B`'s contents.
    pub fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    /// A `TPM2B` with its size prefix, as it is passed back to the TPM.
    pub fn tpm2b_whole(&mut self) -> Result<&'a [u8], TpmError> {
        let start = self.at;
        self.tpm2b()?;
        Ok(&self.b[start..self.at])
    }
}

/// A response: its handles and parameters.
pub struct Response {
    /// The whole response.
    pub bytes: Vec<u8>,
    /// Where the output handles start (after the header).
    pub body: usize,
    /// Whether it has a sessions area (and so a parameter size after the handles).
    pub sessions: bool,
}

impl Response {
    /// Checks the header of `bytes`, the reply to command `cc`.
    pub fn parse(cc: u32, bytes: Vec<u8>) -> Result<Response, TpmError> {
        let mut r = Reader::new(&bytes);
        let tag = r.u16()?;
        let size = r.u32()? as usize;
        let rc = r.u32()?;
        if size != bytes.len() {
            return Err(TpmError::Malformed("the response size does not match"));
        }
        if rc != 0 {
            return Err(TpmError::Rc { command: cc, rc });
        }
        Ok(Response {
            body: 10,
            sessions: tag == SESSIONS,
            bytes,
        })
    }

    /// A reader over the output handles (then, through [`Response::params`], the parameters).
    pub fn handles(&self) -> Reader<'_> {
        Reader {
            b: &self.bytes,
            at: self.body,
        }
    }

    /// A reader over the parameters, after `handles` output handles.
    pub fn params(&self, handles: usize) -> Result<Reader<'_>, TpmError> {
        let mut r = self.handles();
        r.bytes(4 * handles)?;
        if self.sessions {
            let size = r.u32()? as usize;
            let start = r.at;
            r.bytes(size)?;
            return Ok(Reader {
                b: &self.bytes[..start + size],
                at: start,
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_carries_its_size_and_code() {
        let c = Cmd::new(NO_SESSIONS, 0x165).u32(0x8000_0001).finish();
        assert_eq!(c, [0x80, 0x01, 0, 0, 0, 14, 0, 0, 1, 0x65, 0x80, 0, 0, 1]);
        let pw = Cmd::new(SESSIONS, 1).password_auth().finish();
        assert_eq!(&pw[10..], &[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_response_code_and_short_replies_are_errors_not_panics() {
        let err = Response::parse(0x15e, vec![0x80, 1, 0, 0, 0, 10, 0, 0, 1, 0x28])
            .err()
            .expect("rc");
        assert!(matches!(err, TpmError::Rc { rc: 0x128, .. }), "{err}");
        assert!(Response::parse(1, vec![0x80, 1, 0, 0]).is_err());
        assert!(Response::parse(1, vec![0x80, 1, 0, 0, 0, 99, 0, 0, 0, 0]).is_err());
        let mut r = Reader::new(&[0, 5, 1]);
        assert!(r.tpm2b().is_err());
    }

    #[test]
    fn parameters_follow_handles_and_the_parameter_size() {
        let resp = vec![
            0x80, 0x02, 0, 0, 0, 21, 0, 0, 0, 0, // header
            0x80, 0, 0, 7, // handle
            0, 0, 0, 4, // parameter size
            0, 2, 0xab, // TPM2B (3 bytes of the 4), 1 byte left
        ];
        let mut resp = resp;
        resp.push(0xcd);
        resp[5] = resp.len() as u8;
        let r = Response::parse(1, resp).expect("ok");
        assert_eq!(r.handles().u32().expect("handle"), 0x8000_0007);
        let mut p = r.params(1).expect("params");
        assert_eq!(p.tpm2b().expect("2b"), &[0xab, 0xcd]);
    }
}
