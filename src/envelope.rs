//! The wire format with the callers: one JSON request in, one JSON response out
//! (cpi-contract.md sections 1.2 and 1.3).
//!
//! Parsing never panics and never gives up without a typed error, whatever the
//! bytes; the response always carries `result`, `error` and `log` (a string).

use serde_json::{json, Map, Value};

use crate::error::{CpiError, ErrorKind};

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub arguments: Vec<Value>,
    pub context: Map<String, Value>,
    /// The negotiated contract version; absent before the director negotiates.
    pub api_version: Option<u64>,
}

impl Request {
    pub fn request_id(&self) -> Option<&str> {
        self.context.get("request_id").and_then(Value::as_str)
    }

    /// Results are shaped for v2 unless the caller explicitly negotiated v1.
    pub fn wants_v1_shapes(&self) -> bool {
        self.api_version == Some(1)
    }
}

pub fn parse_request(bytes: &[u8]) -> Result<Request, CpiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(CpiError::bad_request(
            "empty request: expected one JSON object on stdin",
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        CpiError::bad_request(format!(
            "request is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| CpiError::bad_request(format!("request is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(CpiError::bad_request(format!(
            "request must be a JSON object, got {}",
            json_type(&value)
        )));
    };
    let method = match object.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(other) => {
            return Err(CpiError::bad_request(format!(
                "'method' must be a non-empty string, got {}",
                json_type(&other)
            )))
        }
        None => return Err(CpiError::bad_request("Must provide 'method' key")),
    };
    let arguments = match object.remove("arguments") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(CpiError::bad_request(format!(
                "'arguments' must be an array, got {}",
                json_type(&other)
            )))
        }
        None => return Err(CpiError::bad_request("Must provide 'arguments' key")),
    };
    let context = match object.remove("context") {
        Some(Value::Object(c)) => c,
        None | Some(Value::Null) => Map::new(),
        Some(other) => {
            return Err(CpiError::bad_request(format!(
                "'context' must be an object, got {}",
                json_type(&other)
            )))
        }
    };
    let api_version = match object.remove("api_version") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(other) => {
            return Err(CpiError::bad_request(format!(
                "'api_version' must be a non-negative integer, got {other}"
            )))
        }
    };
    Ok(Request {
        method,
        arguments,
        context,
        api_version,
    })
}

/// A JSON type name for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub result: Value,
    pub error: Option<CpiError>,
    pub log: String,
}

impl Response {
    pub fn to_json(&self) -> Value {
        let error = match &self.error {
            None => Value::Null,
            Some(e) => json!({
                "type": e.kind.bosh_type(),
                "message": e.message,
                "ok_to_retry": e.ok_to_retry,
            }),
        };
        // When `error` is set the director ignores `result`; keep it null.
        let result = if self.error.is_some() {
            Value::Null
        } else {
            self.result.clone()
        };
        json!({"result": result, "error": error, "log": self.log})
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a `Value` cannot fail; fall back to a fixed document anyway.
        serde_json::to_vec(&self.to_json()).unwrap_or_else(|_| {
            br#"{"result":null,"error":{"type":"Bosh::Clouds::CloudError","message":"could not serialize the response","ok_to_retry":false},"log":""}"#.to_vec()
        })
    }

    /// Writes the one response document to stdout and flushes (a Rust
    /// `process::exit` would skip the flush). Exit 0 unless even that failed.
    pub fn write_to_stdout(&self) -> std::process::ExitCode {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(&self.to_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::FAILURE,
        }
    }

    pub fn is_error_of(&self, kind: ErrorKind) -> bool {
        self.error.as_ref().is_some_and(|e| e.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        parse_request(bytes).unwrap_err().message
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert!(err(b"").contains("empty request"));
        assert!(err(b"  \n").contains("empty request"));
        assert!(err(b"\xff\xfe").contains("UTF-8"));
        assert!(err(b"{").contains("not valid JSON"));
        assert!(err(b"[1]").contains("must be a JSON object, got an array"));
        assert!(err(b"{\"arguments\":[]}").contains("'method'"));
        assert!(err(b"{\"method\":3,\"arguments\":[]}").contains("non-empty string"));
        assert!(err(b"{\"method\":\"info\"}").contains("'arguments'"));
        assert!(err(b"{\"method\":\"info\",\"arguments\":{}}").contains("must be an array"));
        assert!(err(b"{\"method\":\"info\",\"arguments\":[],\"context\":1}").contains("'context'"));
        assert!(
            err(b"{\"method\":\"info\",\"arguments\":[],\"api_version\":\"2\"}")
                .contains("api_version")
        );
    }

    #[test]
    fn director_and_cli_requests_parse() {
        let r = parse_request(br#"{"method":"info","arguments":[],"context":{"director_uuid":"d","request_id":"cpi-123456"}}"#).unwrap();
        assert_eq!(r.method, "info");
        assert_eq!(r.api_version, None);
        assert_eq!(r.request_id(), Some("cpi-123456"));
        let r = parse_request(br#"{"method":"has_vm","arguments":["vm-1"],"context":{"director_uuid":"d","vm":{"stemcell":{"api_version":2}}},"api_version":1}"#).unwrap();
        assert!(r.wants_v1_shapes());
    }

    #[test]
    fn error_responses_have_all_keys_and_null_result() {
        let r = Response {
            result: json!("ignored"),
            error: Some(CpiError::vm_not_found("vm-1")),
            log: String::new(),
        };
        assert_eq!(
            r.to_json(),
            json!({"result": null, "error": {"type": "Bosh::Clouds::VMNotFound", "message": "VM 'vm-1' not found", "ok_to_retry": false}, "log": ""})
        );
    }
}
