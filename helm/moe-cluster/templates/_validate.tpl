{{/*
Rules across keys that values.schema.json cannot express. Each failure names the key and value
and says what to change. Called once, from templates/validate.yaml.
*/}}
{{- define "moe-cluster.validate" -}}
{{- $v := .Values }}
{{- /* model */}}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "model.pvc.claimName is empty but model.source is \"pvc\": name the existing PersistentVolumeClaim that holds the model directories" }}
{{- end }}
{{- if and (eq $v.model.source "hostPath") (not $v.model.hostPath.path) }}
{{- fail "model.hostPath.path is empty but model.source is \"hostPath\": give the node directory that holds the model directories" }}
{{- end }}
{{- if eq $v.model.source "image" }}
{{- if not $v.model.image.repository }}
{{- fail "model.image.repository is empty but model.source is \"image\": give the weights image's repository in your registry" }}
{{- end }}
{{- if not (or $v.model.image.tag $v.model.image.digest) }}
{{- fail (printf "model.image.tag and model.image.digest are both empty for model.image.repository=%q: pin the weights image by tag or digest" $v.model.image.repository) }}
{{- end }}
{{- end }}
{{- if or (hasPrefix "/" $v.model.path) (has ".." (splitList "/" $v.model.path)) }}
{{- fail (printf "model.path=%q must be relative to /models and must not contain '..'" $v.model.path) }}
{{- end }}
{{- /* experts and their worker groups */}}
{{- $names := dict }}
{{- $cpus := 0.0 }}
{{- $gpus := 0.0 }}
{{- range $i, $g := (include "moe-cluster.expertGroups" $ | fromYamlArray) }}
{{- if hasKey $names $g.name }}
{{- fail (printf "experts.groups[%d].name=%q is used twice: group names must be unique" $i $g.name) }}
{{- end }}
{{- $_ := set $names $g.name true }}
{{- if gt (int $g.minReplicas) (int $g.replicas) }}
{{- fail (printf "experts.groups[%d].minReplicas=%d is more than its replicas=%d" $i (int $g.minReplicas) (int $g.replicas)) }}
{{- end }}
{{- if lt (int $g.maxReplicas) (int $g.replicas) }}
{{- fail (printf "experts.groups[%d].maxReplicas=%d is less than its replicas=%d" $i (int $g.maxReplicas) (int $g.replicas)) }}
{{- end }}
{{- $cpus = addf $cpus (mulf $g.replicas $g.cpus) }}
{{- $gpus = addf $gpus (mulf $g.replicas $g.gpusPerPod) }}
{{- end }}
{{- $needCpus := mulf $v.experts.hosts $v.experts.cpusPerHost }}
{{- $needGpus := mulf $v.experts.hosts $v.experts.gpusPerHost }}
{{- if gt $needCpus $cpus }}
{{- fail (printf "experts.hosts=%v x experts.cpusPerHost=%v needs %v CPUs, but experts.groups offer %v (replicas x cpus): add worker pods or CPUs, or lower the hosts' CPUs" $v.experts.hosts $v.experts.cpusPerHost $needCpus $cpus) }}
{{- end }}
{{- if gt $needGpus $gpus }}
{{- fail (printf "experts.hosts=%v x experts.gpusPerHost=%v needs %v GPUs, but experts.groups offer %v (replicas x gpusPerPod): add GPU worker pods, or lower experts.gpusPerHost" $v.experts.hosts $v.experts.gpusPerHost $needGpus $gpus) }}
{{- end }}
{{- if and (not $v.experts.plan.configMap) (gt (int $v.experts.replicas) (int $v.experts.hosts)) }}
{{- fail (printf "experts.replicas=%d is more than experts.hosts=%d: every expert's replicas need distinct hosts" (int $v.experts.replicas) (int $v.experts.hosts)) }}
{{- end }}
{{- /* router */}}
{{- if and $v.router.autoscaling.enabled (gt (int $v.router.autoscaling.minReplicas) (int $v.router.autoscaling.maxReplicas)) }}
{{- fail (printf "router.autoscaling.minReplicas=%d is more than router.autoscaling.maxReplicas=%d" (int $v.router.autoscaling.minReplicas) (int $v.router.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) (int $v.router.port)) }}
{{- fail (printf "metrics.port=%d is also router.port: give the metrics their own port" (int $v.metrics.port)) }}
{{- end }}
{{- $rayPorts := list (int $v.ray.gcsPort) (int $v.ray.nodeManagerPort) (int $v.ray.objectManagerPort) (int $v.ray.metricsPort) }}
{{- if ne (len (uniq $rayPorts)) 4 }}
{{- fail (printf "ray.gcsPort, ray.nodeManagerPort, ray.objectManagerPort and ray.metricsPort must differ (got %v)" $rayPorts) }}
{{- end }}
{{- range $key, $port := dict "router.port" $v.router.port "metrics.port" $v.metrics.port }}
{{- if and (has (int $port) $rayPorts) (or (eq $key "router.port") $v.metrics.enabled) }}
{{- fail (printf "%s=%d is also a Ray port of the router pod's Ray node (ray.*Port): pick another" $key (int $port)) }}
{{- end }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.enabled is false: enable the metrics to scrape them" }}
{{- end }}
{{- /* TLS and auth: names of existing Secrets, never key material */}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.existingSecret is empty but tls.enabled is true: create a kubernetes.io/tls Secret (tls.crt, tls.key) and name it here" }}
{{- end }}
{{- if and $v.tls.clientCA.existingSecret (not $v.tls.enabled) }}
{{- fail (printf "tls.clientCA.existingSecret=%q needs tls.enabled=true: mutual TLS is TLS with client certificates" $v.tls.clientCA.existingSecret) }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) }}
{{- fail "auth.existingSecret is empty but auth.enabled is true: create a Secret holding the token and name it here" }}
{{- end }}
{{- end }}
