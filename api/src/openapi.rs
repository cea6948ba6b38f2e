//! The OpenAPI 3.1 document of the REST API.
//!
//! Paths come from the `#[utoipa::path]` attribute on each handler, collected by the same
//! `utoipa_axum` router that serves them, so a route cannot be served without being described.
//! Types the API owns derive `ToSchema` where they are defined; the replicated model types live
//! in the `raft` crate, which stays free of HTTP concerns, so they are described here by mirror
//! schemas (a test serializes real model values and checks them against these). Every
//! operation is then given the problem+json error responses and, unless public, bearer
//! security, in one place.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, ContentBuilder, OpenApi as Doc, Ref, RefOr, ResponseBuilder};
use utoipa::OpenApi;

/// Mirrors of the `raft::model` types as the API serializes them.
pub mod schemas {
    use std::collections::BTreeMap;

    use utoipa::ToSchema;

    /// A role; earlier roles include the later ones' rights.
    #[derive(ToSchema)]
    #[schema(rename_all = "kebab-case")]
    pub enum Role {
        /// The whole cluster, every tenant.
        Admin,
        /// Everything inside one tenant, users included.
        TenantAdmin,
        /// VMs inside one tenant.
        Operator,
        /// Read-only inside one tenant.
        Viewer,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum VmState {
        Pending,
        Scheduled,
        Starting,
        Running,
        Stopping,
        Stopped,
        Migrating,
        Failed,
        Deleting,
        /// Its node is down; what it does there is not known.
        Unknown,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum DesiredState {
        Running,
        Stopped,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum OperationState {
        Pending,
        Running,
        Succeeded,
        Failed,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum NodeState {
        Up,
        Suspect,
        Down,
    }

    /// Limits of a tenant; absent means unlimited.
    #[derive(ToSchema)]
    pub struct Quota {
        pub max_vms: Option<u64>,
        pub max_vcpus: Option<u64>,
        pub max_memory_mib: Option<u64>,
        pub max_disk_gib: Option<u64>,
    }

    /// What a tenant's VMs reserve now.
    #[derive(ToSchema)]
    pub struct Usage {
        pub vms: u64,
        pub vcpus: u64,
        pub memory_mib: u64,
        pub disk_gib: u64,
    }

    #[derive(ToSchema)]
    pub struct Tenant {
        pub id: String,
        pub name: String,
        pub quota: Quota,
        pub usage: Usage,
        /// Milliseconds since the Unix epoch.
        pub created_at: u64,
        pub updated_at: u64,
        /// The ETag of the tenant.
        pub version: u64,
    }

    #[derive(ToSchema)]
    pub struct Vm {
        pub id: String,
        pub name: String,
        pub tenant: String,
        pub vcpus: u32,
        pub memory_mib: u64,
        pub disk_gib: u64,
        pub image: Option<String>,
        pub labels: BTreeMap<String, String>,
        /// The node the VM is placed on, once scheduled.
        pub node: Option<u64>,
        pub desired_state: DesiredState,
        pub state: VmState,
        pub ha: bool,
        pub anti_affinity_group: Option<String>,
        /// Fencing epoch of the placement.
        pub epoch: u64,
        pub created_at: u64,
        pub updated_at: u64,
        pub version: u64,
        pub placement: PlacementConstraints,
    }

    /// What a VM asks of its node besides room (the scheduler enforces it).
    #[derive(ToSchema)]
    pub struct PlacementConstraints {
        /// The node the VM must run on.
        pub node: Option<u64>,
        pub node_selector: BTreeMap<String, String>,
        /// VMs of the same tenant and affinity group run on the same node.
        pub affinity_group: Option<String>,
    }

    /// What a node can hold, as its agent reported.
    #[derive(ToSchema)]
    pub struct NodeCapacity {
        pub vcpus: u32,
        pub memory_mib: u64,
        /// Size of the filesystem holding VM disks; null when unknown (not checked).
        pub disk_gib: Option<u64>,
    }

    /// The filter that refused a node.
    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    pub enum FilterKind {
        NodeNotUp,
        Unschedulable,
        CapacityUnknown,
        RequiredNode,
        NodeSelector,
        Cpu,
        Memory,
        Disk,
        AntiAffinity,
        Affinity,
    }

    /// Long work: finishes when the node's agent has done it.
    #[derive(ToSchema)]
    pub struct Operation {
        pub id: String,
        pub kind: String,
        pub tenant: String,
        /// `vm/<id>` and the like.
        pub target: String,
        pub state: OperationState,
        pub error: Option<String>,
        pub created_at: u64,
        pub updated_at: u64,
    }

    /// An operation as `GET /operations/{id}` shows it: with what the work produced.
    #[derive(ToSchema)]
    pub struct OperationView {
        pub id: String,
        pub kind: String,
        pub tenant: String,
        /// `vm/<id>` and the like.
        pub target: String,
        pub state: OperationState,
        pub error: Option<String>,
        /// For `vm.migrate`: `{phase, source, target, mode: live|handoff, reason, total_ms,
        /// downtime_ms, bytes}`; absent for other kinds.
        #[schema(value_type = Option<Object>)]
        pub result: Option<serde_json::Value>,
        pub created_at: u64,
        pub updated_at: u64,
    }

    /// One hash-chained record of a mutating call or login.
    #[derive(ToSchema)]
    pub struct AuditEntry {
        pub seq: u64,
        pub at: u64,
        pub actor: String,
        pub tenant: String,
        pub action: String,
        pub target: String,
        pub result: String,
        pub prev_hash: String,
        pub hash: String,
    }

    /// How to reach a node.
    #[derive(ToSchema)]
    pub struct Member {
        pub name: String,
        pub api_addr: String,
        pub peer_addr: String,
    }

    #[derive(ToSchema)]
    pub struct NodeRecord {
        pub id: u64,
        pub member: Member,
        pub state: NodeState,
        /// False while drained.
        pub schedulable: bool,
        pub labels: BTreeMap<String, String>,
        pub joined_at: u64,
        pub updated_at: u64,
        pub removed: bool,
        /// Null until the node's agent reported it.
        pub capacity: Option<NodeCapacity>,
    }

    /// A node with what is placed on it.
    #[derive(ToSchema)]
    pub struct NodeView {
        pub id: u64,
        pub member: Member,
        pub state: NodeState,
        pub schedulable: bool,
        pub labels: BTreeMap<String, String>,
        pub joined_at: u64,
        pub updated_at: u64,
        pub removed: bool,
        pub capacity: Option<NodeCapacity>,
        pub vms: u64,
        pub vcpus_used: u64,
        pub memory_mib_used: u64,
    }

    #[derive(ToSchema)]
    pub struct TenantPage {
        pub items: Vec<Tenant>,
        pub next_cursor: Option<String>,
    }

    /// An RFC 9457 problem: every error of the API.
    #[derive(ToSchema)]
    pub struct Problem {
        /// `https://novacron.dev/problems/<code>`
        #[schema(rename = "type")]
        pub kind: String,
        pub title: String,
        pub status: u16,
        pub detail: String,
        /// Stable machine-readable code (`not_found`, `quota_exceeded`, ...).
        pub code: String,
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "NovaCron",
        description = "The REST API served by every NovaCron node."
    ),
    components(schemas(schemas::Problem, crate::Consistency))
)]
struct Base;

/// Statuses every operation may answer with a problem, and why.
const PROBLEMS: &[(&str, &str)] = &[
    ("400", "invalid request"),
    ("403", "the caller's role does not allow this"),
    ("404", "no such object, or another tenant's"),
    ("409", "conflict or quota exceeded"),
    ("412", "If-Match does not match the current version"),
    ("413", "request body too large"),
    ("421", "this node is not the leader"),
    ("429", "rate limited; see Retry-After"),
    ("500", "internal error"),
    ("503", "no leader known, or the request timed out"),
    ("504", "the cluster did not answer in time"),
];

/// Statuses also answered before a handler runs. Malformed JSON, a missing content type and
/// an unparsable query are problems like any other (`routes::extract`); an undecodable path is
/// still refused by the framework in plain text, so both kinds stay documented.
const REJECTIONS: &[&str] = &["400", "415", "422"];

fn problem_content() -> Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build()
}

fn add_problems(op: &mut Operation, secured: bool) {
    let mut statuses: Vec<(&str, &str)> = PROBLEMS.to_vec();
    if secured {
        statuses.push(("401", "missing, invalid, expired or revoked credentials"));
    }
    statuses.push(("415", "the body is not application/json"));
    statuses.push(("422", "the body does not match the request schema"));
    for (status, why) in statuses {
        if op.responses.responses.contains_key(status) {
            continue;
        }
        let mut b = ResponseBuilder::new()
            .description(why)
            .content("application/problem+json", problem_content());
        if REJECTIONS.contains(&status) {
            b = b.content(
                "text/plain",
                ContentBuilder::new()
                    .schema(Some(utoipa::openapi::schema::Object::with_type(
                        utoipa::openapi::schema::Type::String,
                    )))
                    .build(),
            );
        }
        if status == "429" {
            b = b.header(
                "Retry-After",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(Some(utoipa::openapi::schema::Object::with_type(
                        utoipa::openapi::schema::Type::Integer,
                    )))
                    .description(Some("seconds to wait"))
                    .build(),
            );
        }
        op.responses
            .responses
            .insert(status.to_string(), RefOr::T(b.build()));
    }
}

/// Completes the document collected from the handlers: servers' paths under `/api/v1`, the
/// bearer scheme, and the problem responses of every operation.
pub(crate) fn finish(collected: Doc) -> Doc {
    let mut doc = Base::openapi().merge_from(collected);
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT or nck_<id>_<secret>")
                .build(),
        ),
    );
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            // Public operations carry an empty security requirement.
            let secured = op
                .security
                .iter()
                .flatten()
                .any(|r| r != &SecurityRequirement::default());
            add_problems(op, secured);
        }
    }
    doc
}

/// The document as committed in `api/openapi.json`.
pub fn document() -> Doc {
    crate::routes::openapi()
}

/// [`document`] as pretty JSON with a trailing newline.
pub fn document_json() -> Result<String, serde_json::Error> {
    let mut s = document().to_pretty_json()?;
    s.push('\n');
    Ok(s)
}
