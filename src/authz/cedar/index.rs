//! Policy slicing: which policies can possibly apply to a request, decided from their scope.
//!
//! Cedar evaluates every policy of the set it is given. With hundreds of per-team rules most of
//! them are for another action or another namespace, so the loaded set is split once per load:
//! per action, the policies whose action scope admits that action, and within an action, the
//! policies scoped to one namespace (`resource in k8s::Namespace::"x"`, or
//! `resource is T in k8s::Namespace::"x"`) apart from the rest. A request is evaluated against
//! the action's `common` set plus its namespace's set, and the two responses are combined with
//! Cedar's own rule (a satisfied forbid denies; else a satisfied permit allows; else deny).
//!
//! This is exact, not a heuristic: Cedar checks the scope before the conditions, so a policy
//! whose scope cannot match is never satisfied and never raises an error. A policy whose action
//! or resource scope is unconstrained (or constrained in a way the index does not understand)
//! is put in every slice it may apply to.

use std::collections::HashMap;

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicyId, PolicySet, PolicySetError, ResourceConstraint,
};

use super::schema::CompiledSchema;

/// A policy that could not be put in a slice.
#[derive(Debug, thiserror::Error)]
#[error("indexing policy {policy}: {source}")]
pub(crate) struct IndexError {
    policy: PolicyId,
    #[source]
    source: Box<PolicySetError>,
}

#[derive(Default)]
pub(crate) struct ActionSlice {
    /// Policies for this action that are not scoped to a single namespace.
    pub common: PolicySet,
    /// Policies for this action scoped to one namespace, by namespace name.
    pub by_namespace: HashMap<String, PolicySet>,
}

pub(crate) struct PolicyIndex {
    by_action: HashMap<String, ActionSlice>,
    /// Load order of every policy id, for a stable order of determining policies.
    pub order: HashMap<String, usize>,
    /// `@reason` annotations by policy id (looking an annotation up in a `PolicySet` parses
    /// the key, so they are read once here).
    pub reasons: HashMap<String, String>,
}

fn action_applies(
    constraint: &ActionConstraint,
    action: &EntityUid,
    schema: &CompiledSchema,
) -> bool {
    // `action in [g, ...]` holds when the action is g itself or a member of group g.
    let within =
        |group: &EntityUid| group == action || schema.action_entities.is_ancestor_of(group, action);
    match constraint {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => a == action,
        ActionConstraint::In(groups) => groups.iter().any(within),
    }
}

/// The namespace a policy's resource scope confines it to, if any.
fn namespace_scope(policy: &Policy, schema: &CompiledSchema) -> Option<String> {
    let uid = match policy.resource_constraint() {
        ResourceConstraint::In(uid) | ResourceConstraint::IsIn(_, uid) => uid,
        _ => return None,
    };
    (uid.type_name() == &schema.types.namespace).then(|| uid.id().unescaped().to_owned())
}

impl PolicyIndex {
    pub fn build(schema: &CompiledSchema, policies: &PolicySet) -> Result<PolicyIndex, IndexError> {
        let mut by_action: HashMap<String, ActionSlice> = HashMap::new();
        let mut order = HashMap::new();
        let scoped: Vec<(&Policy, ActionConstraint, Option<String>)> = policies
            .policies()
            .map(|p| (p, p.action_constraint(), namespace_scope(p, schema)))
            .collect();
        let mut reasons = HashMap::new();
        for (i, (p, _, _)) in scoped.iter().enumerate() {
            order.insert(p.id().to_string(), i);
            if let Some(reason) = p.annotation("reason") {
                reasons.insert(p.id().to_string(), reason.to_owned());
            }
        }
        for (name, info) in &schema.actions {
            let action = &info.uid;
            let mut slice = ActionSlice::default();
            for (policy, constraint, namespace) in &scoped {
                if !action_applies(constraint, action, schema) {
                    continue;
                }
                let set = match namespace {
                    Some(ns) => slice.by_namespace.entry(ns.clone()).or_default(),
                    None => &mut slice.common,
                };
                set.add((*policy).clone()).map_err(|source| IndexError {
                    policy: policy.id().clone(),
                    source: Box::new(source),
                })?;
            }
            by_action.insert(name.clone(), slice);
        }
        Ok(PolicyIndex {
            by_action,
            order,
            reasons,
        })
    }

    /// The policy sets to evaluate for `action` on a resource in `namespace` ("" for none).
    pub fn slices<'a>(&'a self, action: &str, namespace: &str) -> Vec<&'a PolicySet> {
        let Some(slice) = self.by_action.get(action) else {
            return Vec::new();
        };
        let mut sets = Vec::with_capacity(2);
        if !slice.common.is_empty() {
            sets.push(&slice.common);
        }
        if !namespace.is_empty() {
            if let Some(set) = slice.by_namespace.get(namespace) {
                sets.push(set);
            }
        }
        sets
    }
}
