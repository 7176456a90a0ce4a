//! A small client for the admin API, used by the `sluice token` commands
//! and by `loadtest` to provision tokens and verify stored data.

use std::fmt;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    /// The API answered with an error status; `body` is its JSON error.
    #[error("admin API answered {status}: {body}")]
    Api { status: u16, body: String },
}

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
    /// `base` is like `http://127.0.0.1:9090`.
    pub fn new(base: &str, token: &str) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<Option<Value>, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|source| ClientError::Transport {
            url: url.to_string(),
            source,
        })?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Api { status, body: text });
        }
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Api {
                status,
                body: format!("unparseable response ({e}): {text}"),
            })
    }

    /// `POST /applications/{app}/tokens`; the result includes the secret.
    pub async fn create_token(&self, app: &str, body: &Value) -> Result<Value, ClientError> {
        let url = format!("{}/applications/{app}/tokens", self.base);
        Ok(self
            .send(self.http.post(&url).json(body), &url)
            .await?
            .unwrap_or(Value::Null))
    }

    pub async fn list_tokens(&self, app: &str) -> Result<Value, ClientError> {
        let url = format!("{}/applications/{app}/tokens", self.base);
        Ok(self
            .send(self.http.get(&url), &url)
            .await?
            .unwrap_or(Value::Null))
    }

    /// `PATCH` the token's status (`"active"` or `"inactive"`).
    pub async fn set_status(
        &self,
        app: &str,
        id: &str,
        status: &str,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/applications/{app}/tokens/{id}", self.base);
        let body = serde_json::json!({ "status": status });
        Ok(self
            .send(self.http.patch(&url).json(&body), &url)
            .await?
            .unwrap_or(Value::Null))
    }

    pub async fn delete_token(&self, app: &str, id: &str) -> Result<(), ClientError> {
        let url = format!("{}/applications/{app}/tokens/{id}", self.base);
        self.send(self.http.delete(&url), &url).await?;
        Ok(())
    }

    /// `POST /backup`: the broker writes a backup into `to`, a directory
    /// on the broker's machine.
    pub async fn backup(&self, to: &str) -> Result<Value, ClientError> {
        let url = format!("{}/backup", self.base);
        let body = serde_json::json!({ "to": to });
        Ok(self
            .send(self.http.post(&url).json(&body), &url)
            .await?
            .unwrap_or(Value::Null))
    }

    /// One page of `GET …/state`; `query` is appended as given
    /// (e.g. `order=asc&limit=10000`).
    pub async fn history(
        &self,
        app: &str,
        device: &str,
        query: &str,
    ) -> Result<Value, ClientError> {
        let url = format!(
            "{}/applications/{app}/devices/{device}/state?{query}",
            self.base
        );
        Ok(self
            .send(self.http.get(&url), &url)
            .await?
            .unwrap_or(Value::Null))
    }
}
