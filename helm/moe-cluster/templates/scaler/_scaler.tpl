{{/* Names and rules of the expert-group scaler (scaler.enabled). */}}

{{- define "moe-cluster.scalerName" -}}
{{- include "moe-cluster.componentName" (list . "scaler") }}
{{- end }}

{{/*
Rules of the scaler's values that values.schema.json cannot express; each failure names the key
and value. Called from the scaler's Deployment, so only when scaler.enabled.
*/}}
{{- define "moe-cluster.validateScaler" -}}
{{- $v := .Values }}
{{- if ne $v.ray.mode "kuberay" }}
{{- fail (printf "scaler.enabled needs ray.mode=kuberay (got %q): without KubeRay there is no RayCluster to scale; a Ray cluster with its own autoscaler takes `moe-cluster scale --ray-address`" $v.ray.mode) }}
{{- end }}
{{- if not $v.scaler.groups }}
{{- fail "scaler.groups is empty but scaler.enabled is true: name the worker groups to scale and their replicas" }}
{{- end }}
{{- $known := list }}
{{- range $v.experts.groups }}
{{- $known = append $known .name }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $g := $v.scaler.groups }}
{{- if not (has $g.name $known) }}
{{- fail (printf "scaler.groups[%d].name=%q is not a group of experts.groups %v" $i $g.name $known) }}
{{- end }}
{{- if hasKey $seen $g.name }}
{{- fail (printf "scaler.groups[%d].name=%q is used twice" $i $g.name) }}
{{- end }}
{{- $_ := set $seen $g.name true }}
{{- if and (hasKey $g "minReplicas") (hasKey $g "maxReplicas") (gt (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- fail (printf "scaler.groups[%d].minReplicas=%d is more than its maxReplicas=%d" $i (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}
