//! The text of a denial, worded the way kube-apiserver words its own `Forbidden` answers
//! (k8s.io/apiserver endpoints/handlers/responsewriters `forbiddenMessage` + apierrors
//! `NewForbidden`), so kubectl users see the familiar line plus the policy's reason.

use super::Decision;
use crate::authz::requestinfo::RequestInfo;

/// Why `decision` came out the way it did, in one short phrase.
pub fn decision_reason(decision: &Decision) -> String {
    if decision.explicit_deny || (decision.errors.is_empty() && !decision.determining.is_empty()) {
        if let Some(reason) = &decision.reason {
            return reason.clone();
        }
        if let Some(id) = decision.determining.first() {
            let word = if decision.allowed {
                "allowed"
            } else {
                "denied"
            };
            return format!("{word} by policy {id:?}");
        }
    }
    if !decision.errors.is_empty() {
        return match decision.determining.first() {
            Some(id) => format!("policy {id:?} could not be evaluated"),
            // Nothing in the policy set failed: the request itself does not fit the schema.
            None => format!(
                "the gateway's policy cannot decide this request ({})",
                decision.errors[0]
            ),
        };
    }
    if decision.allowed {
        "allowed".to_owned()
    } else {
        "no policy allows it".to_owned()
    }
}

/// kube-apiserver's Forbidden message for this request, ending with the policy's reason:
///
/// `pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "prod": denied by policy "prod-needs-managed-device"`
pub fn reason_message(info: &RequestInfo, user: &str, verb: &str, decision: &Decision) -> String {
    let reason = decision_reason(decision);
    if !info.is_resource_request {
        return format!(
            "forbidden: User {user:?} cannot {verb} path {:?}: {reason}",
            info.path
        );
    }
    let mut resource = info.resource.clone();
    if !info.subresource.is_empty() {
        resource.push('/');
        resource.push_str(&info.subresource);
    }
    let scope = if info.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace {:?}", info.namespace)
    };
    let detail = format!(
        "User {user:?} cannot {verb} resource {resource:?} in API group {:?} {scope}: {reason}",
        info.api_group
    );
    // schema.GroupResource.String(): "resource" or "resource.group".
    let qualified = if info.api_group.is_empty() {
        info.resource.clone()
    } else {
        format!("{}.{}", info.resource, info.api_group)
    };
    if qualified.is_empty() {
        format!("forbidden: {detail}")
    } else if info.name.is_empty() {
        format!("{qualified} is forbidden: {detail}")
    } else {
        format!("{qualified} {:?} is forbidden: {detail}", info.name)
    }
}
