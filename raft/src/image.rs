//! Disk images in the replicated state: their metadata (name, tenant, size, checksum, upload
//! state) and which nodes hold their bytes. The bytes themselves never enter Raft: they live in
//! the image store of the node that received the upload and of every node that fetched them.
//!
//! Keys (prefix `img/`): `img/i/<id>` the image, `img/n/<tenant len>/<tenant>/<name>` the id of
//! a tenant's image by name (names are unique per tenant).

use serde::{Deserialize, Serialize};

use crate::apply::{get, put, reject, ApplyError, StateTx};
use crate::command::{Command, RejectCode, Response};
use crate::model::{Millis, NodeId};

/// Every image record starts with this.
pub const IMAGE_PREFIX: &[u8] = b"img/i/";

pub fn image_key(id: &str) -> Vec<u8> {
    let mut k = IMAGE_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn image_name_key(tenant: &str, name: &str) -> Vec<u8> {
    format!("img/n/{}/{tenant}/{name}", tenant.len()).into_bytes()
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Bytes are arriving on `upload_node`; the image cannot be used yet.
    Uploading,
    /// The bytes were verified against `sha256` and can back VMs.
    Ready,
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// The announced size; an upload may not write past it and must reach it to finish.
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 the bytes must have, announced when the upload is created.
    pub sha256: String,
    pub state: ImageState,
    /// The node that receives the upload's chunks (in its local image store).
    pub upload_node: NodeId,
    /// Nodes holding the verified bytes, in the order they got them.
    pub locations: Vec<NodeId>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub version: u64,
}

/// Applies the image commands; `None` for any other command.
pub(crate) fn apply(
    tx: &dyn StateTx,
    command: &Command,
    at: Millis,
) -> Result<Option<Response>, ApplyError> {
    let response = match command {
        Command::CreateImage { image } => {
            let name_key = image_name_key(&image.tenant, &image.name);
            if tx.get(&name_key)?.is_some() || tx.get(&image_key(&image.id))?.is_some() {
                return Ok(Some(reject(
                    RejectCode::AlreadyExists,
                    format!("image {} already exists", image.name),
                )));
            }
            let mut image = image.clone();
            image.state = ImageState::Uploading;
            image.locations.clear();
            image.created_at = at;
            image.updated_at = at;
            image.version = 0;
            put(tx, &image_key(&image.id), &image)?;
            tx.put(&name_key, image.id.clone().into_bytes())?;
            Response::Image(image)
        }
        Command::ImageStored { id, node } => {
            let Some(mut image) = get::<Image>(tx, &image_key(id))? else {
                return Ok(Some(reject(
                    RejectCode::NotFound,
                    format!("image {id} not found"),
                )));
            };
            // Only the node that received the upload can complete it; any node may later
            // announce a verified copy.
            if image.state == ImageState::Uploading && image.upload_node != *node {
                return Ok(Some(reject(
                    RejectCode::Invalid,
                    format!(
                        "the upload of image {id} is held by node {}",
                        image.upload_node
                    ),
                )));
            }
            if image.state == ImageState::Ready && image.locations.contains(node) {
                return Ok(Some(Response::Image(image)));
            }
            image.state = ImageState::Ready;
            image.locations.push(*node);
            image.updated_at = at;
            image.version += 1;
            put(tx, &image_key(id), &image)?;
            Response::Image(image)
        }
        Command::DeleteImage { id } => {
            let Some(image) = get::<Image>(tx, &image_key(id))? else {
                return Ok(Some(reject(
                    RejectCode::NotFound,
                    format!("image {id} not found"),
                )));
            };
            tx.remove(&image_key(id))?;
            tx.remove(&image_name_key(&image.tenant, &image.name))?;
            Response::Ok
        }
        _ => return Ok(None),
    };
    Ok(Some(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{apply as apply_request, MemState};
    use crate::Request;

    fn image(id: &str, name: &str, upload_node: NodeId) -> Image {
        Image {
            id: id.into(),
            name: name.into(),
            tenant: "t1".into(),
            size_bytes: 10,
            sha256: "ab".into(),
            state: ImageState::Ready,
            upload_node,
            locations: vec![9],
            created_at: 0,
            updated_at: 0,
            version: 7,
        }
    }

    fn run(st: &MemState, command: Command) -> Response {
        apply_request(st, &Request::new(100, "test", command), 1).unwrap()
    }

    #[test]
    fn an_upload_becomes_ready_only_from_its_node_then_gains_locations() {
        let st = MemState::default();
        let Response::Image(created) = run(
            &st,
            Command::CreateImage {
                image: image("i1", "deb", 2),
            },
        ) else {
            panic!("not created")
        };
        // Whatever the proposer sent, a new image starts uploading, nowhere, at version 0.
        assert_eq!(created.state, ImageState::Uploading);
        assert!(created.locations.is_empty());
        assert_eq!(created.version, 0);
        let dup = run(
            &st,
            Command::CreateImage {
                image: image("i2", "deb", 3),
            },
        );
        assert!(matches!(
            dup,
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));

        let wrong = run(
            &st,
            Command::ImageStored {
                id: "i1".into(),
                node: 3,
            },
        );
        assert!(matches!(
            wrong,
            Response::Rejected {
                code: RejectCode::Invalid,
                ..
            }
        ));
        let Response::Image(ready) = run(
            &st,
            Command::ImageStored {
                id: "i1".into(),
                node: 2,
            },
        ) else {
            panic!("not stored")
        };
        assert_eq!(ready.state, ImageState::Ready);
        assert_eq!(ready.locations, [2]);
        let Response::Image(copied) = run(
            &st,
            Command::ImageStored {
                id: "i1".into(),
                node: 3,
            },
        ) else {
            panic!("not stored")
        };
        assert_eq!(copied.locations, [2, 3]);
        let Response::Image(again) = run(
            &st,
            Command::ImageStored {
                id: "i1".into(),
                node: 3,
            },
        ) else {
            panic!("not stored")
        };
        assert_eq!(again.locations, [2, 3], "announcing twice adds nothing");

        assert_eq!(
            run(&st, Command::DeleteImage { id: "i1".into() }),
            Response::Ok
        );
        // The name is free again.
        assert!(matches!(
            run(
                &st,
                Command::CreateImage {
                    image: image("i3", "deb", 1)
                }
            ),
            Response::Image(_)
        ));
    }
}
