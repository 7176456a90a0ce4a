//! The client of the admin API, shared by the `sluice token` commands and
//! by `loadtest` (which builds this crate with only the `client` feature,
//! so it never compiles the broker or RocksDB).

use std::fmt;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad admin API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the admin API ({method} {url}): {source}")]
    Transport {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    /// The API answered with an error status; `body` is its JSON error.
    #[error("admin API answered {status} to {method} {url}: {body}")]
    Api {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },
}

/// Holds the bearer token; `Debug` never shows it.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9090`; a bare `HOST:PORT` gets
    /// `http://`. Every request gives up after `timeout`.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<AdminClient, ClientError> {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let bad = |reason: String| ClientError::BadUrl {
            url: base.clone(),
            reason,
        };
        reqwest::Url::parse(&base).map_err(|e| bad(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(AdminClient {
            base,
            token: token.to_string(),
            http,
        })
    }

    /// Sends a request; the body text of a 2xx answer, else `Api`.
    async fn send(
        &self,
        method: &'static str,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<String, ClientError> {
        let transport = |source| ClientError::Transport {
            method,
            url: url.to_string(),
            source,
        };
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Api {
                method,
                url: url.to_string(),
                status,
                body: text,
            });
        }
        Ok(text)
    }

    /// Like `send`, parsing the answer as JSON (`Null` when empty).
    async fn send_json(
        &self,
        method: &'static str,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<Value, ClientError> {
        let text = self.send(method, req, url).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Api {
            method,
            url: url.to_string(),
            status: 200,
            body: format!("unparseable response ({e}): {text}"),
        })
    }

    fn tokens_url(&self, app: &str) -> String {
        format!("{}/applications/{app}/tokens", self.base)
    }

    /// `POST /applications/{app}/tokens`; the answer includes the secret.
    pub async fn create_token(&self, app: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.tokens_url(app);
        self.send_json("POST", self.http.post(&url).json(body), &url)
            .await
    }

    pub async fn list_tokens(&self, app: &str) -> Result<Value, ClientError> {
        let url = self.tokens_url(app);
        self.send_json("GET", self.http.get(&url), &url).await
    }

    /// `PATCH` the token's status (`"active"` or `"inactive"`).
    pub async fn set_status(
        &self,
        app: &str,
        id: &str,
        status: &str,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/{id}", self.tokens_url(app));
        let body = serde_json::json!({ "status": status });
        self.send_json("PATCH", self.http.patch(&url).json(&body), &url)
            .await
    }

    pub async fn delete_token(&self, app: &str, id: &str) -> Result<(), ClientError> {
        let url = format!("{}/{id}", self.tokens_url(app));
        self.send("DELETE", self.http.delete(&url), &url).await?;
        Ok(())
    }

    /// `GET /cluster`: the broker's view of the cluster (root token).
    pub async fn cluster_status(&self) -> Result<Value, ClientError> {
        let url = format!("{}/cluster", self.base);
        self.send_json("GET", self.http.get(&url), &url).await
    }

    /// `POST /backup`: the broker writes a backup into `to`, a directory
    /// on the broker's machine.
    pub async fn backup(&self, to: &str) -> Result<Value, ClientError> {
        let url = format!("{}/backup", self.base);
        let body = serde_json::json!({ "to": to });
        self.send_json("POST", self.http.post(&url).json(&body), &url)
            .await
    }

    /// `GET /cluster/ingest`: a cluster-mode broker's position in the
    /// ingest stream and the stream's newest state (`streamLast`), read
    /// now; `None` from a standalone broker (404).
    pub async fn ingest_status(&self) -> Result<Option<Value>, ClientError> {
        let url = format!("{}/cluster/ingest", self.base);
        match self.send_json("GET", self.http.get(&url), &url).await {
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            other => other.map(Some),
        }
    }

    /// One page of a device's history, oldest first, up to 10,000 states,
    /// as the raw response text (the stored data is byte-exact in it);
    /// `cursor` is the previous page's `next`. With `min_seq` (cluster
    /// mode) the broker answers once its read model holds that stream
    /// sequence, or 503 `not_caught_up` after its bounded wait.
    pub async fn state_page(
        &self,
        app: &str,
        device: &str,
        cursor: Option<&str>,
        min_seq: Option<u64>,
    ) -> Result<String, ClientError> {
        let mut url = reqwest::Url::parse(&format!(
            "{}/applications/{app}/devices/{device}/state",
            self.base
        ))
        .map_err(|e| ClientError::BadUrl {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("order", "asc").append_pair("limit", "10000");
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
            if let Some(s) = min_seq {
                q.append_pair("minSeq", &s.to_string());
            }
        }
        let text = url.to_string();
        self.send("GET", self.http.get(url), &text).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_and_redaction() {
        let t = Duration::from_secs(1);
        let c = AdminClient::new("127.0.0.1:9090/", "secret-token", t).unwrap();
        let dbg = format!("{c:?}");
        assert!(dbg.contains(r#"base: "http://127.0.0.1:9090""#), "{dbg}");
        assert!(!dbg.contains("secret-token"), "{dbg}");
        let c = AdminClient::new("https://admin.example:1", "x", t).unwrap();
        assert!(format!("{c:?}").contains(r#""https://admin.example:1""#));
        assert!(matches!(
            AdminClient::new("http://[bad", "x", t),
            Err(ClientError::BadUrl { .. })
        ));
    }
}
