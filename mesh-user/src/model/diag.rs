//! Diagnostics: what is wrong (or unsupported) with an object, naming where it came
//! from, the object, and the field.

use std::fmt;

use super::ObjectRef;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The object (or this version of it) is not used.
    Error,
    /// The object is used, but part of it cannot be honoured at L4.
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Where the object came from: a file path, or `kubernetes`.
    pub origin: String,
    /// The object, if it could be identified.
    pub object: Option<ObjectRef>,
    /// Field path within the object, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
}

impl Diagnostic {
    pub fn error(object: &ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, object, field, message)
    }

    pub fn warning(
        object: &ObjectRef,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(Severity::Warning, object, field, message)
    }

    fn new(
        severity: Severity,
        object: &ObjectRef,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity,
            origin: String::new(),
            object: Some(object.clone()),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn with_origin(mut self, origin: &str) -> Self {
        origin.clone_into(&mut self.origin);
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.origin.is_empty() {
            write!(f, "{}: ", self.origin)?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}
