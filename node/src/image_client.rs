//! `novacron image upload FILE --name N`, `image list`, `image show ID`: the client side of
//! the resumable image upload. The upload resumes by itself: an upload of the same name, size
//! and checksum that is still in progress is continued from the offset the cluster reports,
//! and a chunk refused for its offset (or lost on the network) is resent from there.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload a qcow2 image in checksummed chunks (resumes an interrupted upload).
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Admins: upload into this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Chunk size in KiB; must fit the API's body limit (1 MiB by default).
        #[arg(long, default_value_t = 512)]
        chunk_kib: usize,
    },
    List,
    Show {
        id: String,
    },
}

/// What the client needs of a connection: base URL and token.
pub struct Target<'a> {
    pub http: &'a reqwest::Client,
    pub url: &'a str,
    pub token: Option<&'a str>,
}

impl Target<'_> {
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let req = match self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let (status, v) = self.send(req).await?;
        if !(200..300).contains(&status) {
            bail!(
                "{} ({}, HTTP {status})",
                v["detail"].as_str().unwrap_or("request failed"),
                v["code"].as_str().unwrap_or("error")
            );
        }
        Ok(v)
    }

    async fn offset(&self, id: &str) -> anyhow::Result<u64> {
        let v = self
            .json(
                reqwest::Method::GET,
                &format!("/api/v1/images/{id}/upload"),
                None,
            )
            .await?;
        v["offset"]
            .as_u64()
            .ok_or_else(|| anyhow!("the cluster reported no offset"))
    }
}

fn sha256_of(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Uploads `file` as image `name`, resuming an unfinished upload of the same bytes; returns
/// the finished image.
pub async fn upload(
    t: &Target<'_>,
    file: &Path,
    name: &str,
    tenant: Option<&str>,
    chunk: usize,
) -> anyhow::Result<Value> {
    let (sha, size) = sha256_of(file)?;
    let list = t.json(reqwest::Method::GET, "/api/v1/images", None).await?;
    let existing = list["items"].as_array().and_then(|items| {
        items
            .iter()
            .find(|i| {
                i["name"] == name
                    && i["sha256"] == sha.as_str()
                    && i["size_bytes"] == size
                    && tenant.is_none_or(|t| i["tenant"] == t)
            })
            .cloned()
    });
    let image = match existing {
        Some(i) => i,
        None => {
            let mut body = json!({"name": name, "size_bytes": size, "sha256": sha});
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            t.json(reqwest::Method::POST, "/api/v1/images", Some(body))
                .await?
        }
    };
    let id = image["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the cluster returned no image id"))?
        .to_string();
    if image["state"] == "ready" {
        return Ok(image);
    }
    let mut f = std::fs::File::open(file)?;
    let mut buf = vec![0u8; chunk.max(1)];
    let mut at = t.offset(&id).await?;
    let mut failures = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf[..n])?;
        let req = t
            .http
            .put(format!("{}/api/v1/images/{id}/upload", t.url))
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("bytes {at}-{}/{size}", at + n as u64 - 1),
            )
            .body(buf[..n].to_vec());
        match t.send(req).await {
            Ok((200, v)) => {
                at = v["offset"].as_u64().unwrap_or(at + n as u64);
                failures = 0;
            }
            // Not where the cluster is (an earlier chunk did arrive after all): ask and resume.
            Ok((409, v)) if v["code"] == "offset_mismatch" => at = t.offset(&id).await?,
            other => {
                failures += 1;
                if failures > 5 {
                    let why = match other {
                        Ok((s, v)) => format!("HTTP {s}: {}", v["detail"].as_str().unwrap_or("")),
                        Err(e) => e.to_string(),
                    };
                    bail!("upload of {name} failed at byte {at}: {why}");
                }
                tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                at = t.offset(&id).await.unwrap_or(at);
            }
        }
    }
    t.json(
        reqwest::Method::POST,
        &format!("/api/v1/images/{id}/finish"),
        Some(json!({ "sha256": sha })),
    )
    .await
}

/// Runs an image subcommand; the caller prints the returned value.
pub async fn run(t: &Target<'_>, cmd: ImageCommand) -> anyhow::Result<Value> {
    match cmd {
        ImageCommand::Upload {
            file,
            name,
            tenant,
            chunk_kib,
        } => upload(t, &file, &name, tenant.as_deref(), chunk_kib * 1024).await,
        ImageCommand::List => t.json(reqwest::Method::GET, "/api/v1/images", None).await,
        ImageCommand::Show { id } => {
            t.json(reqwest::Method::GET, &format!("/api/v1/images/{id}"), None)
                .await
        }
    }
}
