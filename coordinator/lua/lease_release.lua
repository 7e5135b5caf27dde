-- lease_release.lua: give a lease up, only if the caller still holds it.
--
-- KEYS[1] lease key
-- ARGV[1] holder token
-- Returns 1 if released, 0 if someone else holds it (or nobody)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
