-- Plans nothing: the cost of the call itself.
return { schedule = function() end }
