{{/*
Names. With release name "inferfleet" every object is named as in manifests/ ("inferfleet-operator").
*/}}
{{- define "inferfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "inferfleet.operatorName" -}}
{{- printf "%s-operator" (include "inferfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferfleet.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Labels on every object. `app.kubernetes.io/managed-by: Helm` keeps them out of the operator's
own watch selector (`app.kubernetes.io/managed-by=inferfleet-operator`, its children only).
*/}}
{{- define "inferfleet.labels" -}}
app.kubernetes.io/part-of: inferfleet
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The operator pod's selector: the same single label as manifests/operator.yaml. A selector is
immutable, and app.kubernetes.io/instance is also Argo CD's default tracking label, so it stays out.
*/}}
{{- define "inferfleet.selectorLabels" -}}
app.kubernetes.io/name: inferfleet-operator
{{- end -}}

{{- define "inferfleet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/*
RBAC rules: operator/rbac.py's RULES, in its order, split by scope. The cluster-scoped one
(CustomResourceDefinitions) always needs a ClusterRole; the namespaced ones go into the
ClusterRole with --all-namespaces, or into a Role per watched namespace. Each rule is commented
with its layer and reason exactly as in manifests/rbac.yaml; tests/ship/test_ship_chart.py
checks both against operator/rbac.py.
*/}}
{{- define "inferfleet.rules.clusterScoped" -}}
# Framework: kopf discovers the InferenceService CRD and follows its changes.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{- define "inferfleet.rules.namespaced" -}}
# Framework: kopf watches InferenceServices and patches its progress annotations and finalizer.
- apiGroups: [inferfleet.io]
  resources: [inferenceservices]
  verbs: [list, watch, patch]
# Framework: kopf posts handler failures and the autoscaler's decisions as events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Application: drift handlers and the status refresher read the owning InferenceService.
- apiGroups: [inferfleet.io]
  resources: [inferenceservices]
  verbs: [get]
# Application: status (replicas, conditions, pre-pull and balloon progress, autoscaler decision).
- apiGroups: [inferfleet.io]
  resources: [inferenceservices/status]
  verbs: [patch]
# Application: the autoscaler writes spec.replicas through the scale subresource.
- apiGroups: [inferfleet.io]
  resources: [inferenceservices/scale]
  verbs: [patch]
# Application: children's owner references block the owner's deletion (blockOwnerDeletion), which OwnerReferencesPermissionEnforcement (OpenShift, hardened clusters) allows only with this.
- apiGroups: [inferfleet.io]
  resources: [inferenceservices/finalizers]
  verbs: [update]
# Application: workers, balloons, pre-pull: server-side apply (create+patch), drift watch, pruning.
- apiGroups: [apps]
  resources: [deployments, daemonsets]
  verbs: [get, list, watch, create, patch, delete]
# Application: the workers' Service: server-side apply and drift watch (owner GC deletes it).
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
# Application: the workers' PodDisruptionBudget: applied while >1 pod is wanted, pruned otherwise.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# Application: worker readiness for status, pod addresses for the autoscaler's scrape.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
{{- end -}}
