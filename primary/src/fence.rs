//! Fencing (invariant 5: at any term at most one VM instance releases output). A primary is
//! fenced when it learns of a newer term — the failover manager says so (`fence <term>` on its
//! control socket), or a backup refuses it for a stale term — and from that moment on it never
//! releases guest output again. Every release goes through [`Fence::unless_fenced`], under the
//! same lock that [`Fence::fence`] takes: once `fence` has returned, no release is running and
//! none will start.

use std::sync::Mutex;

/// Why a primary is fenced: the newer term it learned of (None when the refusal did not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The newer term, if known.
    pub term: Option<u64>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Fence {
    by: Mutex<Option<Fenced>>,
}

impl Fence {
    /// Fences this primary (the first reason is kept); returns the reason in force.
    pub fn fence(&self, term: Option<u64>) -> Fenced {
        let mut by = self.by.lock().unwrap_or_else(|p| p.into_inner());
        *by.get_or_insert(Fenced { term })
    }

    /// Why this primary is fenced, if it is.
    pub fn fenced(&self) -> Option<Fenced> {
        *self.by.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` (a release of guest output) unless this primary is fenced, holding the fence's
    /// lock meanwhile; None if fenced.
    pub fn unless_fenced<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let by = self.by.lock().unwrap_or_else(|p| p.into_inner());
        match *by {
            Some(_) => None,
            None => Some(f()),
        }
    }
}

/// The newer term a `Refuse StaleTerm` names: its detail reads "stale term <ours>, current
/// term is <theirs>" (`ProtocolError::StaleTerm`).
pub fn term_in_refusal(detail: &str) -> Option<u64> {
    let (_, rest) = detail.split_once("current term is ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_primary_releases_nothing_and_keeps_its_first_reason() {
        let f = Fence::default();
        assert_eq!(f.unless_fenced(|| 7), Some(7));
        assert_eq!(f.fence(Some(5)), Fenced { term: Some(5) });
        assert_eq!(f.fence(Some(9)), Fenced { term: Some(5) });
        assert_eq!(f.unless_fenced(|| 7), None);
        assert_eq!(f.fenced(), Some(Fenced { term: Some(5) }));
    }

    #[test]
    fn reads_the_term_of_a_stale_term_refusal() {
        let e = protocol::ProtocolError::StaleTerm { got: 1, current: 5 };
        assert_eq!(term_in_refusal(&e.to_string()), Some(5));
        assert_eq!(term_in_refusal("something else"), None);
    }
}
