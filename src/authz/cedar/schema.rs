//! The project's Cedar schema (embedded from `config/ztgate.cedarschema`) and everything the
//! engine derives from it once per process: type names, action uids and the action hierarchy.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid, Schema};

use super::{PolicyError, PolicyErrors};

/// The schema text, exactly as shipped in `config/ztgate.cedarschema`.
pub const SCHEMA_TEXT: &str = include_str!("../../../config/ztgate.cedarschema");

/// Where the embedded schema came from, for error messages.
pub const SCHEMA_ORIGIN: &str = "config/ztgate.cedarschema";

/// The parsed schema plus the names the entity builder needs on every request.
pub(crate) struct CompiledSchema {
    pub schema: Schema,
    /// Action entities (with the `read` / `write` groups as parents).
    pub action_entities: Entities,
    /// Every action declared in the schema, by name (`get`, `list`, ..., `read`, `write`).
    pub actions: HashMap<String, ActionInfo>,
    pub types: TypeNames,
}

/// One action of the schema and what it applies to.
pub(crate) struct ActionInfo {
    pub uid: EntityUid,
    /// Its entity (parents = its action groups), added to each request's entities.
    pub entity: Entity,
    /// `appliesTo` principal and resource types (empty for the action groups).
    pub principals: Vec<EntityTypeName>,
    pub resources: Vec<EntityTypeName>,
}

impl ActionInfo {
    /// Whether a request with these principal and resource types is one the schema declares
    /// for this action (what `Request::new` checks with a schema, without building the request).
    pub fn applies_to(&self, principal: &EntityTypeName, resource: &EntityTypeName) -> bool {
        self.principals.contains(principal) && self.resources.contains(resource)
    }
}

/// The entity type names of the `k8s` namespace, parsed once.
pub(crate) struct TypeNames {
    pub user: EntityTypeName,
    pub workload: EntityTypeName,
    pub group: EntityTypeName,
    pub namespace: EntityTypeName,
    pub resource: EntityTypeName,
    pub non_resource_url: EntityTypeName,
    pub impersonated_user: EntityTypeName,
    pub impersonated_group: EntityTypeName,
    pub impersonated_uid: EntityTypeName,
    pub impersonated_extra: EntityTypeName,
}

/// A type name of the `k8s` namespace that Cedar cannot parse.
#[derive(Debug, thiserror::Error)]
#[error("entity type k8s::{name}: {source}")]
pub(crate) struct TypeNameError {
    name: &'static str,
    #[source]
    source: Box<cedar_policy::ParseErrors>,
}

impl TypeNames {
    fn new() -> Result<TypeNames, TypeNameError> {
        let t = |name: &'static str| {
            EntityTypeName::from_str(&format!("k8s::{name}")).map_err(|source| TypeNameError {
                name,
                source: Box::new(source),
            })
        };
        Ok(TypeNames {
            user: t("User")?,
            workload: t("Workload")?,
            group: t("Group")?,
            namespace: t("Namespace")?,
            resource: t("Resource")?,
            non_resource_url: t("NonResourceURL")?,
            impersonated_user: t("ImpersonatedUser")?,
            impersonated_group: t("ImpersonatedGroup")?,
            impersonated_uid: t("ImpersonatedUid")?,
            impersonated_extra: t("ImpersonatedExtra")?,
        })
    }
}

impl CompiledSchema {
    /// Parses a schema in the Cedar human-readable format.
    pub fn parse(origin: &str, text: &str) -> Result<CompiledSchema, PolicyErrors> {
        let (schema, warnings) = Schema::from_cedarschema_str(text).map_err(|e| {
            PolicyErrors::one(PolicyError::diagnostic(
                origin,
                text,
                &cedar_policy::ffi::DetailedError::from(&e),
            ))
        })?;
        for w in warnings {
            tracing::warn!(origin, warning = %w, "cedar schema warning");
        }
        let internal = |message: String| {
            PolicyErrors::one(PolicyError {
                origin: origin.to_owned(),
                line: None,
                column: None,
                message,
            })
        };
        let action_entities = schema
            .action_entities()
            .map_err(|e| internal(format!("schema actions: {e}")))?;
        let action_type = EntityTypeName::from_str("k8s::Action")
            .map_err(|e| internal(format!("action type: {e}")))?;
        let mut actions = HashMap::new();
        for entity in action_entities.iter() {
            let uid = entity.uid();
            if uid.type_name() == &action_type {
                let principals = schema
                    .principals_for_action(&uid)
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                let resources = schema
                    .resources_for_action(&uid)
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                let info = ActionInfo {
                    uid: uid.clone(),
                    entity: entity.clone(),
                    principals,
                    resources,
                };
                actions.insert(uid.id().unescaped().to_owned(), info);
            }
        }
        let types = TypeNames::new().map_err(|e| internal(e.to_string()))?;
        Ok(CompiledSchema {
            schema,
            action_entities,
            actions,
            types,
        })
    }

    /// The embedded schema, parsed on first use and shared afterwards.
    pub fn embedded() -> Result<Arc<CompiledSchema>, PolicyErrors> {
        static EMBEDDED: OnceLock<Result<Arc<CompiledSchema>, PolicyErrors>> = OnceLock::new();
        EMBEDDED
            .get_or_init(|| CompiledSchema::parse(SCHEMA_ORIGIN, SCHEMA_TEXT).map(Arc::new))
            .clone()
    }

    /// `k8s::Action::"<verb>"`, when the schema declares that action.
    pub fn action(&self, verb: &str) -> Option<&ActionInfo> {
        self.actions.get(verb)
    }

    pub fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }
}
